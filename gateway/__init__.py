"""Telematics gateway for shared electric cars: MQTT in, InfluxDB out, signed commands, booking API."""

__version__ = "0.7.0"
