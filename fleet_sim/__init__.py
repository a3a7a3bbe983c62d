"""Simulated devices for scale tests, benchmarks and drills: many paho clients on one epoll loop that speak the real
protocol (``fleet_protocol``) but run no model. A tool beside the agent and the server, shipped on neither."""
