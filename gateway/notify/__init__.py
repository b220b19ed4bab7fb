"""Telling people what happened: the event log, the webhook deliveries, and the alerts."""
