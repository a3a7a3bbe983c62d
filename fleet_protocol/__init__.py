"""What the fleet server and the device agent must agree on: signed update metadata and its verification, deltas,
chunked transfer, MQTT topics and message schemas. Bytes in, bytes out: no sockets, no files except where a caller
hands in a path to assemble into."""
