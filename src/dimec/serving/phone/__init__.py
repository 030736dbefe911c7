"""The phone: MobileClient (route, run the mobile stage, hand the rest to a remote tier), its FleetPolicy
(privacy, budget, deadlines, the edge's advice) and emulated links. Imports only the runtime and plan data
below it (tests/test_serving.py guards the list). See serving/__init__.py."""
