"""Real three-tier serving of a trained and calibrated run (docs/serving.md).

- package:  the tier package format (manifest with sha256 and the model identity); finding a package
- export:   `dimec export` -> one package per tier; onnx_export: the mobile tier as one int8 ONNX graph
- tier:     TierModel, the one class that loads a package and runs its layers (used by FastAPI and Ray)
- wire:     the hidden-state body of continuation requests (safetensors, fp16)
- continuation: running the rest of a plan on the edge or cloud, forwarding edge -> cloud
- server:   FastAPI app for the edge and cloud tiers (auth, limits, metrics)
- links:    user-space emulation of mobile->edge / mobile->cloud links (latency, jitter, bandwidth, loss)
- client:   MobileClient: route to a plan, run the mobile stage, answer or ship the hidden state, fallbacks
- local:    start/stop servers on loopback (threads or subprocesses)
- profile:  `dimec profile` -> the cost-model profile in milliseconds (with the hidden-state factor)
- ray_app:  the same tiers on Ray Serve (optional extra)
"""
