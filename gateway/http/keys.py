"""The typed keys under which the app keeps what request handlers use."""

from __future__ import annotations

from aiohttp import web

from gateway.booking.rentals import Rentals
from gateway.booking.service import Booking
from gateway.fleet import Fleet
from gateway.http.ratelimit import RateLimiter
from gateway.ingest.state import FleetState
from gateway.metrics import Monitor
from gateway.notify.feed import Feed

FLEET = web.AppKey("fleet", Fleet)
STATE = web.AppKey("state", FleetState)
BOOKING = web.AppKey("booking", Booking)
RENTALS = web.AppKey("rentals", Rentals)
LIMITER = web.AppKey("limiter", RateLimiter)
MONITOR = web.AppKey("monitor", Monitor)
FEED = web.AppKey("feed", Feed)
