"""Telemetry from the cars to InfluxDB: validation, latest state, the on-disk journal, the writer and its sinks."""
