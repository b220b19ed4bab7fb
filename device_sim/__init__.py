"""Simulated cars for the fleet gateway: demos, tests and load benchmarks.

Every car follows the contract (docs/car-integration.md): it publishes ``battery``,
``location``, ``doors`` and a retained ``status`` under ``{prefix}/{id}/``
with QoS 1, sets a retained will ``{"online": false}``, verifies signed
commands on ``{prefix}/{id}/commands`` with its own key and acks them on
``{prefix}/{id}/commands/ack``. ``python -m device_sim --help`` runs it from
the command line; docs/simulator.md explains the model and the measurements.

The async API, for tests (including the gateway's) and scripts::

    from device_sim import Behaviour, Fault, SimConfig, SimFleet

    cfg = SimConfig(host="127.0.0.1", port=1883, prefix="fleet", master_key="...",
                    vehicles=300, speed=60, seed=1, behaviours={"ZOE-003": Behaviour.NO_ACK})
    async with SimFleet(cfg) as sim:           # connects every car, starts their day
        await sim.wait_ready(timeout=10)        # every car's full state acknowledged by the broker
        sim.stats.sent                          # messages published so far (also .done, .rejected, ...)
        sim.doors("ZOE-017")                    # (locked, closed) as the car knows them
        await sim.inject(Fault.MALFORMED, ["ZOE-001"])   # or "drop", "storm", "clock_skew", ...
        sim.set_behaviour("ZOE-002", Behaviour.FAIL)     # answer every command failed/door_open
        await sim.cause("ZOE-005", "moved_without_trip") # an alert's condition (device_sim.incidents) ...
        await sim.clear("ZOE-005", "moved_without_trip") # ... and back to normal
        sim.cars["ZOE-001"].state               # the car's physics state (soc_pct, odometer_km, ...)
    # on exit: tasks cancelled, a retained {"online": false} per car, clean DISCONNECTs

``SimConfig`` (``device_sim.config``) holds every option; ``Fault``
(``device_sim.faults``) lists the faults and what each one sends. Modules:
``mqtt`` (a minimal asyncio MQTT 3.1.1 client), ``physics`` (pure: battery,
charging, driving), ``commands`` (pure: command verification), ``car`` (one
car's day and answers), ``fleet`` (``SimFleet``), ``incidents`` (the alerts'
conditions on demand, and ``--incidents``), ``renters`` (a booking day through
the gateway's API), ``receiver`` (a webhook receiver), ``cli`` (the command line).
"""

from device_sim.config import Behaviour, Intervals, SimConfig
from device_sim.faults import Fault
from device_sim.fleet import SimFleet

__all__ = ["Behaviour", "Fault", "Intervals", "SimConfig", "SimFleet"]
