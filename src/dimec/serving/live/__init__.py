"""Live control of a served policy's loss (docs/live-control.md): shadow answers, an anytime-valid bound on
the live loss, feedback labels, and a controller that moves the policy along its calibrated path.

    bound.py       the betting confidence sequence for a live mean (Waudby-Smith & Ramdas 2023)
    ledger.py      the uniform shadow sample, per-version evidence, the feedback store and its rate limit
    controller.py  the calibrated path, the controller, the versioned policy (ETag) written to router.json
    http.py        the endpoints and gauges on the cloud, and the client's shadow sender and policy follower

Nothing here imports torch: the pieces are unit-tested on their own and joined to the servers and the
client by a few lines (server.create_app, client.MobileClient.classify, monitor.monitor).
"""
