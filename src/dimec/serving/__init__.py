"""Real three-tier serving of a trained and calibrated run (docs/serving.md). Layers, lowest first; imports
point down only (`python ../shared/tools/import-graph.py src --layers=...`, order in docs/serving.md):

dimec/runtime/ (torch-free, below routing; the phone needs nothing else of dimec's model side)
- plans:        plan data (Stage, Plan, check_plan, plan_text), softmax, confidence, the one stop rule
- executor:     run_plan, the one plan executor (stages here, the rest handed on) and its Outcome
- prerouters:   the pre-routers that choose a plan before any layer runs (centroids, learned)
- policy:       router.json's one reader; ServedPolicy, what the phone serves
- model_config: MultiExitConfig (dimec_model.json) and the one reader of exit temperatures
- package:      the tier package format (manifest with sha256 and the model identity); finding a package
- tier:         TierModel, the one class that loads a package and runs its layers (torch or onnxruntime)
- wire:         the hidden-state body of continuation requests (safetensors, fp16)
- validate:     the request-id rule and the checks of a tier's answer (shared by the servers and the phone)

serving/live/         live loss control (docs/live-control.md): bound (anytime-valid confidence sequence),
                ledger (shadow sample, evidence, feedback), controller (steps along the calibrated path),
                http (the cloud's /v1/shadow, /v1/feedback, /v1/policy; the client's ShadowSender), cli

serving/ops/monitor   drift monitoring: the validation reference, live histograms, `dimec monitor`
serving/phone/        the client side
- links:        user-space emulation of mobile->edge / mobile->cloud links (latency, jitter, bandwidth, loss)
- constraints:  FleetPolicy: privacy, the cloud budget, deadlines, the edge's advice, 429s
- remote:       HttpRemote, one remote tier over HTTP (timeouts, retries, cooldown); Timeouts
- client:       MobileClient: route to a plan, run it through the executor (mobile stage here, the rest on
                the edge or cloud over HTTP: remote.HttpRemote), fallbacks
- settings:     the client's settings (fleet constraints; backend, routing, retries), declared like config.py's
serving/servers/      the edge and cloud
- sources:      sources file: tokens -> sources, priority classes, scheduling settings (FleetConfig)
- bounds:       request bytes in flight, per server and per source (the memory bound)
- batcher:      dynamic batching: gather concurrent requests by priority class within their deadlines
- batched:      a tier's requests as batcher items, and the batched forward pass
- scheduling:   admission, weighted fair queueing, PA-MDI allocation advice
- continuation: PlanRunner, the tier side of a plan (stages here through the executor, forward to the cloud)
- fleet:        the scheduler and metrics around a tier service
- server:       the FastAPI app of a tier (auth, limits, metrics); every request answered as a plan
serving/deploy/       getting tiers running
- onnx_export:  the mobile tier as one int8 ONNX graph
- export:       `dimec export` -> one package per tier
- local:        start/stop servers on loopback (threads or subprocesses)
- ray_app:      the same tiers on Ray Serve (optional extra; @serve.batch)
- web:          `dimec demo`: the browser page (web/) beside the tiers, short-lived loopback tokens
serving/ops/          measuring and planning
- profile:      `dimec profile` -> the cost-model profile in milliseconds (with the hidden-state factor)
- planning:     `dimec plan`: offline analysis of served policies under latency, money and exposure bounds
serving/settings   the registry of every serving settings section (`dimec settings`), saving and --settings
serving/fleet_cli, serving/cli   the commands (`dimec serve`, `client`, `profile`, `plan`, `monitor`, ...)
"""
