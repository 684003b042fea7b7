"""Built-in cost meters: per_token (input and output prices per million tokens) and
device_hour (the request's device seconds times an hourly rate)."""

from __future__ import annotations

import nextoken
from nextoken import Charge, InvalidRequestError


def _price(options: dict, key: str, default: float | None = None) -> float:
    value = options.get(key, default)
    if value is None:
        raise InvalidRequestError(f"cost meter option {key!r} is required")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"cost meter option {key}={value!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise InvalidRequestError(f"cost meter option {key} must be a finite number >= 0, not {value}")
    return value


def _known(meter: str, options: dict, allowed: tuple[str, ...]) -> str:
    """Reject options the meter does not take; return the currency (USD unless given)."""
    unknown = set(options) - set(allowed) - {"currency"}
    if unknown:
        raise InvalidRequestError(
            f"{meter} has no option(s) {', '.join(sorted(unknown))}; it takes {', '.join(allowed)}, currency"
        )
    return str(options.get("currency", "USD"))


def make_per_token(options):
    """Per-token pricing: input_per_million and output_per_million (currency: USD unless given)."""
    currency = _known("per_token", options, ("input_per_million", "output_per_million"))
    inp = _price(options, "input_per_million", 0.0)
    out = _price(options, "output_per_million", 0.0)

    def per_token(usage) -> Charge:
        amount = usage.prompt_tokens * inp / 1e6 + usage.completion_tokens * out / 1e6
        return Charge(
            amount, currency, f"{usage.prompt_tokens} in x {inp:g}/M + {usage.completion_tokens} out x {out:g}/M"
        )

    return per_token


def make_device_hour(options):
    """Per-device-hour pricing: device seconds x hourly_rate / 3600 (a batch shares its device time equally)."""
    currency = _known("device_hour", options, ("hourly_rate", "devices"))
    rate = _price(options, "hourly_rate")
    devices = _price(options, "devices", 1.0)

    def device_hour(usage) -> Charge:
        seconds = usage.wall_ms / 1e3 / max(usage.batch_size, 1) * devices
        return Charge(seconds * rate / 3600.0, currency, f"{seconds:.3f} device-s x {rate:g}/h")

    return device_hour


@nextoken.hookimpl
def register_cost_meters(register):
    register("per_token", make_per_token)
    register("device_hour", make_device_hour)
