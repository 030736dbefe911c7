"""Real three-tier serving of a DIMEC-DC run (docs/serving.md).

- package:  `dimec export` -> one package per tier (weights that tier runs, tokenizer, manifest with sha256)
- onnx_export: the mobile package as ONNX fp32 and int8, checked against PyTorch
- tier:     TierModel, the one class that loads a package and classifies (used by FastAPI and Ray)
- server:   FastAPI app for the edge and cloud tiers (auth, limits, metrics)
- links:    user-space emulation of mobile->edge / mobile->cloud links (latency, jitter, bandwidth, loss)
- client:   MobileClient: embed, route, answer easy samples locally, offload the rest with fallback
- local:    start/stop servers on loopback (threads or subprocesses)
- profile:  `dimec profile` -> the cost-model profile in milliseconds
- ray_app:  the same tiers on Ray Serve (optional extra)
"""
