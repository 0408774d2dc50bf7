#!/usr/bin/env python3
"""The acode EC2 lab: real EC2 behaviour on 127.0.0.1, with nothing reaching AWS.

moto's EC2 (pinned to moto 5.2.5) answers the API. This program wraps it in a
WSGI middleware and a few patches of moto's in-process models to add what
moto lacks: boot/terminate timing, status checks, ClientToken idempotency,
cloud-init console output with real host keys, spot request behaviour
(fulfilment, the cancel race, interruption and reclaim), spot placement scores
and price history, the Price List API's GetProducts, and fault injection. Next
to it run a real OpenSSH sshd (behind a small TCP gate that can refuse or reset
connections) and an IMDSv2-style endpoint.

    python tests/lab/acode_lab.py --state-dir DIR [--boot-delay-s F] ...

One JSON ready line goes to stdout; logs go to DIR/lab.log (warnings also to
stderr). The lab exits on SIGTERM, SIGINT, SIGHUP or EOF on stdin.
README.md in this directory documents the ready line and the control API.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import collections
import contextlib
import copy
import ctypes
import fcntl
import functools
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape, quoteattr

# moto reads these once, at import (moto 5.2.5 moto/settings.py). With them
# RunInstances rejects unknown key pairs and AMIs, as EC2 does.
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_public_key  # noqa: E402
from moto import backends as moto_backends  # noqa: E402
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.iam.models import iam_backends  # noqa: E402
from moto.core import responses as moto_core_responses  # noqa: E402
from moto.core import serialize as moto_serialize  # noqa: E402
from moto.core.serialize import XFormedAttributePicker, return_if_not_empty  # noqa: E402
from moto.ec2 import utils as moto_ec2_utils  # noqa: E402
import xmltodict  # noqa: E402
from moto.ec2.exceptions import InvalidInstanceIdError  # noqa: E402
from moto.ec2.models import EC2Backend, ec2_backends  # noqa: E402
from moto.ec2.models.core import TaggedEC2Resource  # noqa: E402
from moto.ec2.models.instances import Instance, InstanceState, StateReason  # noqa: E402
from moto.ec2.models.spot_requests import SpotInstanceRequest  # noqa: E402
from moto.ec2.responses._base_response import EC2BaseResponse  # noqa: E402
from moto.ec2.utils import generate_dns_from_ip, random_spot_request_id  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.exceptions import HTTPException  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.test import run_wsgi_app  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

log = logging.getLogger("acode-lab")

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
EC2_XMLNS = "http://ec2.amazonaws.com/doc/2016-11-15/"
# An Amazon Linux 2 image from moto's built-in AMI list (moto/ec2/resources/amis.json.gz).
LAB_AMI_NAME = "amzn2-ami-hvm-2.0.20180810-x86_64-gp2"

PENDING = ("pending", 0)
RUNNING = ("running", 16)
SHUTTING_DOWN = ("shutting-down", 32)
TERMINATED = ("terminated", 48)

# Config keys that also have a command-line flag (--boot-delay-s etc.).
CLI_CONFIG_KEYS = ("boot_delay_s", "status_ok_delay_s", "terminate_delay_s", "console_lag_s")
CONSOLE_MODES = ("ok", "wrong-fingerprint", "no-keys", "not-base64")
SPOT_MODES = ("fulfilled", "capacity-not-available", "price-too-low")
STATUS_MODES = ("ok", "impaired", "insufficient-data")
ADDRESS_MODES = ("public", "private-only", "private-loopback")
# What POST /_lab/ssh accepts: "auto" is the timing-based gate (ssh_start_delay_s, ssh_refuse_s).
# "reset" resets each connection at once; "reset-mid-handshake" lets the version exchange through,
# then resets during key exchange; "silent" accepts and never says a word (a banner timeout).
SSH_MODES = ("auto", "open", "closed", "reset", "reset-mid-handshake", "silent")
# What an interruption notice can announce (IMDS spot/instance-action "action").
INTERRUPTION_ACTIONS = ("terminate", "stop", "hibernate")
# EC2's account-level request rate limits (the `throttle` config key "ec2"): one token bucket per action
# family, full at `burst` tokens and refilled at `per_s` tokens a second. RunInstances has its own bucket,
# Describe*/Get*/List* share the non-mutating one, every other action the mutating one.
THROTTLE_FAMILIES = ("run_instances", "mutating", "describe")
EC2_THROTTLE: dict[str, dict[str, float]] = {
    "run_instances": {"burst": 5.0, "per_s": 2.0},
    "mutating": {"burst": 50.0, "per_s": 5.0},
    "describe": {"burst": 100.0, "per_s": 20.0},
}
# The header that tells the lab's one IMDS which instance is asking (the engine sends it; a real
# IMDS ignores it).
IMDS_INSTANCE_HEADER = "X-Acode-Instance-Id"

# DescribeInstanceStatus per check result: (instance/system status, reachability detail status).
# "impaired" is what EC2 shows for a failed check.
STATUS_CHECKS = {
    "initializing": ("initializing", "initializing"),
    "ok": ("ok", "passed"),
    "impaired": ("impaired", "failed"),
    "insufficient-data": ("insufficient-data", "insufficient-data"),
}

DEFAULT_CONFIG: dict[str, Any] = {
    "boot_delay_s": 0.0,
    "status_ok_delay_s": 0.0,
    "terminate_delay_s": 0.0,
    "console_lag_s": 0.0,
    "console_mode": "ok",
    "status_mode": "ok",
    "address_mode": "public",
    "ssh_start_delay_s": 0.0,
    "ssh_refuse_s": 0.0,
    "spot_mode": "fulfilled",
    "spot_fulfill_delay_s": 0.0,
    "placement_scores": {"us-east-1a": 9, "us-east-1b": 3},
    "visibility_delay_s": 0.0,
    "spot_prices": {
        "us-east-1a": 0.0035,
        "us-east-1b": 0.0031,
        "us-east-1c": 0.0040,
        "us-east-1d": 0.0042,
        "us-east-1e": 0.0045,
        "us-east-1f": 0.0050,
    },
    "on_demand_prices": {"t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "m5.large": 0.096},
    "spot_cancel_race": False,
    "spot_reclaim_after_running_s": None,
    "spot_reclaim_notice_s": 120.0,
    "throttle": None,
}

# HTTP status EC2 (and, for the *Exception codes, the JSON services) uses for an
# error code; anything else is a client error.
ERROR_STATUS = {
    "RequestLimitExceeded": 503,
    "InsufficientInstanceCapacity": 500,
    "InternalError": 500,
    "Unavailable": 503,
    "InternalErrorException": 500,
    "ServiceUnavailableException": 503,
}
ERROR_MESSAGES = {
    "RequestLimitExceeded": "Request limit exceeded.",
    "InsufficientInstanceCapacity": "We currently do not have sufficient capacity "
    "in the Availability Zone you requested.",
    "InternalError": "An internal error has occurred.",
    "Unavailable": "The server is overloaded and can't handle the request.",
}

# Spot request status codes and messages as DescribeSpotInstanceRequests shows them.
SPOT_STATUS = {
    "pending-evaluation": "Your Spot request has been submitted for review, and is pending evaluation.",
    "pending-fulfillment": "Your Spot request is pending fulfillment.",
    "fulfilled": "Your spot request is fulfilled.",
    "capacity-not-available": "There is no Spot capacity available that matches your request.",
    "price-too-low": "Your Spot request price is lower than the minimum required Spot request fulfillment price.",
    "marked-for-termination": "Spot Instance is marked for termination.",
    "marked-for-stop": "Spot Instance is marked for stopping.",
    "instance-terminated-by-price": "Your instance was terminated because the Spot price exceeded your maximum price.",
    "instance-stopped-by-price": "Your instance was stopped because the Spot price exceeded your maximum price.",
    "instance-terminated-by-user": "You terminated the Spot Instance.",
    "canceled-before-fulfillment": "The Spot request was canceled before it was fulfilled.",
    "request-canceled-and-instance-running": "Spot request canceled but instance is still running.",
}
# What a reclaim does per announced action: (moto Instance method, request state, request status code).
# moto has no hibernation, so the lab reclaims a hibernating instance as a stopped one.
RECLAIM_OUTCOMES = {
    "terminate": ("terminate", "closed", "instance-terminated-by-price"),
    "stop": ("stop", "disabled", "instance-stopped-by-price"),
    "hibernate": ("stop", "disabled", "instance-stopped-by-price"),
}

# DescribeSpotPriceHistory: the product descriptions the lab prices (every one at the AZ's price),
# and the filters it applies.
SPOT_PRODUCT_DESCRIPTIONS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")
SPOT_PRICE_FILTERS = {
    "availability-zone": "availabilityZone",
    "instance-type": "instanceType",
    "product-description": "productDescription",
    "spot-price": "spotPrice",
}
# The history of each price: (seconds before the latest change, price relative to the configured one),
# latest first, so the configured price is the current one.
SPOT_HISTORY = ((0, 1.0), (53 * 60, 1.04), (2 * 3600 + 41 * 60, 0.97), (5 * 3600 + 17 * 60, 1.08))

# The AWS Price List API (service `pricing`, awsJson1_1), answered on the EC2 port.
PRICING_TARGET_PREFIX = "AWSPriceListService."
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
ON_DEMAND_TERM_CODE = "JRTCKXETXF"  # EC2's code for the on-demand offer term
HOURLY_RATE_CODE = "6YS6EN2CT7"  # and for its hourly price dimension
# vCPUs, memory and family shown for the types the lab knows; other priced types show none.
INSTANCE_SPECS = {
    "t3.micro": ("2", "1 GiB", "General purpose"),
    "t3.small": ("2", "2 GiB", "General purpose"),
    "t3.medium": ("2", "4 GiB", "General purpose"),
    "m5.large": ("2", "8 GiB", "General purpose"),
}
# The products GetProducts has per priced type: (operatingSystem, tenancy, preInstalledSw,
# capacitystatus, usagetype prefix, price factor). As in the real price list, only the first matches
# the filters EC2 clients send (Linux, Shared, NA, Used); the rest make an unfiltered query ambiguous.
PRICE_VARIANTS = (
    ("Linux", "Shared", "NA", "Used", "BoxUsage", 1.0),
    ("Linux", "Shared", "NA", "UnusedCapacityReservation", "UnusedBox", 1.0),
    ("Linux", "Shared", "NA", "AllocatedCapacityReservation", "Reservation", 0.0),
    ("Linux", "Dedicated", "NA", "Used", "DedicatedUsage", 1.1),
    ("Windows", "Shared", "NA", "Used", "BoxUsage", 1.9),
)
# What RunInstances with InstanceMarketOptions.MarketType=spot answers per spot_mode.
SPOT_LAUNCH_ERRORS = {
    "capacity-not-available": (
        "InsufficientInstanceCapacity",
        "There is no Spot capacity available that matches your request.",
    ),
    "price-too-low": (
        "SpotMaxPriceTooLow",
        "Your Spot request price is lower than the minimum required Spot request fulfillment price.",
    ),
}


class BadRequest(Exception):
    """A control-API request the lab rejects with HTTP 400."""


# --------------------------------------------------------------------------
# EC2 wire format helpers
# --------------------------------------------------------------------------


def ec2_error_xml(code: str, message: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    )


def ec2_error_response(code: str, message: str | None = None, status: int | None = None) -> Response:
    body = ec2_error_xml(code, message or ERROR_MESSAGES.get(code, f"{code} (injected by the acode lab)"))
    return Response(body, status=status or ERROR_STATUS.get(code, 400), content_type="text/xml;charset=UTF-8")


def ec2_result_response(action: str, inner_xml: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<{action}Response xmlns="{EC2_XMLNS}"><requestId>{uuid.uuid4()}</requestId>'
        f"{inner_xml}</{action}Response>"
    )
    return Response(body, status=200, content_type="text/xml;charset=UTF-8")


class Ec2HttpError(HTTPException):
    """An EC2 error raised from inside moto's request handling.

    moto 5.2.5 (core/responses.py, BaseResponse.call_action) answers a werkzeug
    HTTPException with its `description` as body and its `code` as status, so
    this gives the lab's own error XML and any status (a moto ServiceException
    would always be 400).
    """

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(description=ec2_error_xml(code, message))
        self.code = status or ERROR_STATUS.get(code, 400)

    def get_headers(self, environ: Any = None, scope: Any = None) -> list[tuple[str, str]]:
        return [("Content-Type", "text/xml;charset=UTF-8")]


def json_response(payload: Any) -> Response:
    """An awsJson1_1 answer (the Price List API)."""
    return Response(
        json.dumps(payload), status=200, content_type=JSON_CONTENT_TYPE, headers={"x-amzn-RequestId": str(uuid.uuid4())}
    )


def json_error_response(code: str, message: str | None = None, status: int | None = None) -> Response:
    """An awsJson1_1 error: the SDKs read the code from `__type` or from the x-amzn-ErrorType header."""
    body = {"__type": code, "message": message or ERROR_MESSAGES.get(code, f"{code} (injected by the acode lab)")}
    headers = {"x-amzn-ErrorType": code, "x-amzn-RequestId": str(uuid.uuid4())}
    return Response(
        json.dumps(body), status=status or ERROR_STATUS.get(code, 400), content_type=JSON_CONTENT_TYPE, headers=headers
    )


def utc_iso(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def utc_at(monotonic_s: float) -> datetime.datetime:
    """The wall-clock moment of a time.monotonic() value: the lab keeps its timeline in monotonic time."""
    return utc_now() + datetime.timedelta(seconds=monotonic_s - time.monotonic())


def parse_utc(value: str) -> datetime.datetime:
    """An ISO-8601 timestamp as the SDKs send it (`2024-01-01T00:00:00Z`, maybe with fractions); naive means UTC."""
    when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def request_fingerprint(form: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """What makes two RunInstances calls "the same request" for ClientToken idempotency."""
    return tuple(sorted((k, v) for k, v in form.items() if k != "ClientToken"))


def form_values(form: dict[str, str], prefix: str) -> list[str]:
    """Values of a query-protocol list such as RegionName.1, RegionName.2, ..."""
    return [v for k, v in sorted(form.items()) if k.startswith(prefix + ".")]


def form_filters(form: dict[str, str]) -> dict[str, list[str]]:
    """EC2 filters from the query form: Filter.N.Name and Filter.N.Value.M."""
    filters: dict[str, list[str]] = {}
    for key, name in form.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "Filter" and parts[2] == "Name":
            filters.setdefault(name, []).extend(form_values(form, f"Filter.{parts[1]}.Value"))
    return filters


def filter_matches(values: list[str], actual: str) -> bool:
    """An EC2 filter value list: any value matches, with EC2's * and ? wildcards (and no others)."""
    return any(re.fullmatch(wildcard_pattern(value), actual) for value in values)


def wildcard_pattern(value: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)


def paginate(items: list[Any], max_results: int, next_token: str | None) -> tuple[list[Any], str | None]:
    """One page and the token for the next (None on the last page). Tokens are offsets."""
    if next_token and not next_token.isdigit():
        raise ValueError(f"bad next token {next_token!r}")
    start = int(next_token) if next_token else 0
    end = start + max_results
    return items[start:end], (str(end) if end < len(items) else None)


# --------------------------------------------------------------------------
# Host keys and console output
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostKey:
    key_type: str  # "ssh-ed25519" or "ssh-rsa"
    blob_b64: str
    bits: int

    @classmethod
    def from_public_file(cls, path: Path) -> HostKey:
        key_type, blob_b64 = path.read_text().split()[:2]
        public_key = load_ssh_public_key(f"{key_type} {blob_b64}".encode())
        bits = public_key.key_size if isinstance(public_key, RSAPublicKey) else 256
        return cls(key_type, blob_b64, bits)

    @property
    def fingerprint(self) -> str:
        """OpenSSH's SHA256 fingerprint, the token `ssh-keygen -lf` prints."""
        digest = hashlib.sha256(base64.b64decode(self.blob_b64)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def label(self) -> str:
        return {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}[self.key_type]


def generate_key_pair(path: Path) -> list[HostKey]:
    """Creates an ed25519 and an RSA-3072 key under `path`, unless they exist; returns the public halves."""
    keys = []
    for key_type, extra in (("ed25519", []), ("rsa", ["-b", "3072"])):
        key_file = path.with_name(f"{path.name}_{key_type}_key")
        if not key_file.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", key_type, *extra, "-N", "", "-C", "root@acode-lab", "-f", str(key_file)],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        keys.append(HostKey.from_public_file(key_file.with_suffix(".pub")))
    return keys


KERNEL_NOISE = [
    b"[    0.000000] Linux version 5.10.223-211.872.amzn2.x86_64 (mockbuild@ip-10-0-43-74) #1 SMP",
    b"[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz-5.10.223 ro console=tty0 console=ttyS0,115200n8",
    b"[    0.000000] x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    b"[    0.412217] ACPI: Early table checksum verification disabled",
    # Serial consoles carry stray bytes; 0xff and 0xfe are never valid UTF-8.
    b"[    0.861034] serial8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A \xff\xfe",
    b"[    1.502336] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode. Opts: (null)",
    b"[\x1b[0;32m  OK  \x1b[0m] Started OpenSSH server daemon.",
    b"Cloud-init v. 19.3-46.amzn2 running 'modules:final' at Mon, 01 Jan 2024 00:00:12 +0000. Up 12.34 seconds.",
]


def render_console(hostname: str, keys: list[HostKey] | None) -> bytes:
    """cloud-init style console text: kernel noise, then (unless keys is None) the host key blocks; CRLF ends."""
    lines = list(KERNEL_NOISE)
    if keys is not None:
        lines.append(b"ec2: #############################################################")
        lines.append(b"ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----")
        lines += [f"ec2: {k.bits} {k.fingerprint} root@{hostname} ({k.label})".encode() for k in keys]
        lines.append(b"ec2: -----END SSH HOST KEY FINGERPRINTS-----")
        lines.append(b"ec2: #############################################################")
        lines.append(b"-----BEGIN SSH HOST KEY KEYS-----")
        lines += [f"{k.key_type} {k.blob_b64} root@{hostname}".encode() for k in keys]
        lines.append(b"-----END SSH HOST KEY KEYS-----")
    lines.append(b"Cloud-init v. 19.3-46.amzn2 finished at Mon, 01 Jan 2024 00:00:13 +0000. Up 13.02 seconds")
    return b"\r\n".join(lines) + b"\r\n"


def instance_hostname(instance: Instance) -> str:
    return "ip-" + (instance.private_ip or "10-0-0-1").replace(".", "-")


def apply_address_mode(instance: Instance, mode: str) -> None:
    """Rewrites the instance's primary network interface for `address_mode`.

    In moto 5.2.5 every address field an answer shows (ipAddress, dnsName,
    privateIpAddress, privateDnsName, the interface's association and address
    set) and every address filter is derived from this one object, so editing
    its data keeps them all in agreement without patching any code.
    """
    nic = instance.nics.get(0)
    if mode == "public" or nic is None:
        return
    nic.public_ip = None
    # NetworkInterface.start() (moto's StartInstances) would draw a new public IP otherwise.
    nic.public_ip_auto_assign = False
    if mode != "private-loopback":
        return
    # moto's address stays reserved in the subnet, so no later instance gets it.
    moto_ip = nic.private_ip_address
    nic.private_ip_address = LOOPBACK
    for entry in nic.private_ip_addresses:
        if entry.get("PrivateIpAddress") == moto_ip:
            entry["PrivateIpAddress"] = LOOPBACK
            if "PrivateDnsName" in entry:
                entry["PrivateDnsName"] = generate_dns_from_ip(LOOPBACK)
    if getattr(nic, "private_dns_name", None):
        nic.private_dns_name = generate_dns_from_ip(LOOPBACK)


# --------------------------------------------------------------------------
# Prices: DescribeSpotPriceHistory and the Price List API
# --------------------------------------------------------------------------


@dataclasses.dataclass
class SpotPriceQuery:
    """The parameters of a DescribeSpotPriceHistory call."""

    instance_types: list[str]  # empty: every type in on_demand_prices
    product_descriptions: list[str]
    availability_zone: str | None
    start: datetime.datetime | None
    end: datetime.datetime | None
    filters: dict[str, list[str]]
    max_results: int
    next_token: str | None

    @classmethod
    def parse(cls, form: dict[str, str]) -> SpotPriceQuery:
        filters = form_filters(form)
        unknown = sorted(set(filters) - set(SPOT_PRICE_FILTERS))
        if unknown:
            raise ValueError(f"The filter '{unknown[0]}' is invalid (the acode lab knows {sorted(SPOT_PRICE_FILTERS)})")
        asked = form_values(form, "ProductDescription")
        max_results = form.get("MaxResults", "1000")
        if not max_results.isdigit() or not 1 <= int(max_results) <= 1000:
            raise ValueError(f"MaxResults must be 1..1000, got {max_results!r}")
        return cls(
            instance_types=form_values(form, "InstanceType"),
            product_descriptions=[d for d in SPOT_PRODUCT_DESCRIPTIONS if not asked or d in asked],
            availability_zone=form.get("AvailabilityZone") or None,
            start=cls._time(form, "StartTime"),
            end=cls._time(form, "EndTime"),
            filters=filters,
            max_results=int(max_results),
            next_token=form.get("NextToken") or None,
        )

    @staticmethod
    def _time(form: dict[str, str], key: str) -> datetime.datetime | None:
        value = form.get(key)
        if not value:
            return None
        try:
            return parse_utc(value)
        except ValueError:
            raise ValueError(f"{key}: not an ISO-8601 timestamp: {value!r}") from None

    def matches(self, item: dict[str, Any]) -> bool:
        return all(filter_matches(values, item[SPOT_PRICE_FILTERS[name]]) for name, values in self.filters.items())


def spot_price_points(
    zone: str, instance_type: str, description: str, price: float, latest: datetime.datetime, query: SpotPriceQuery
) -> list[dict[str, Any]]:
    """The history of one price within the query's StartTime..EndTime, newest first. As in EC2, the
    price in effect at StartTime is included too, so StartTime=now gives the current price."""
    points = [(latest - datetime.timedelta(seconds=ago), price * factor) for ago, factor in SPOT_HISTORY]
    if query.end is not None:
        points = [point for point in points if point[0] <= query.end]
    if query.start is not None:
        in_window = [point for point in points if point[0] >= query.start]
        in_effect = [point for point in points if point[0] <= query.start][:1]
        points = in_window + [point for point in in_effect if point not in in_window]
    return [
        {
            "availabilityZone": zone,
            "instanceType": instance_type,
            "productDescription": description,
            "spotPrice": f"{value:.6f}",
            "timestamp": utc_iso(when),
            "when": when,  # for sorting; not sent
        }
        for when, value in points
    ]


@dataclasses.dataclass
class ProductQuery:
    """The body of a Price List API GetProducts call."""

    service_code: str
    term_matches: list[tuple[str, str]]  # (Field, Value)
    max_results: int
    next_token: str | None

    @classmethod
    def parse(cls, body: Any) -> ProductQuery:
        if not isinstance(body, dict) or not isinstance(body.get("ServiceCode"), str):
            raise ValueError("ServiceCode is required")
        if body.get("FormatVersion", "aws_v1") != "aws_v1":
            raise ValueError("FormatVersion must be aws_v1")
        term_matches = []
        for rule in body.get("Filters") or []:
            if not isinstance(rule, dict) or not all(isinstance(rule.get(k), str) for k in ("Type", "Field", "Value")):
                raise ValueError("every filter needs Type, Field and Value")
            if rule["Type"] != "TERM_MATCH":
                raise ValueError(f"filter type {rule['Type']!r}: the acode lab answers TERM_MATCH only")
            term_matches.append((rule["Field"], rule["Value"]))
        max_results = body.get("MaxResults", 100)
        if type(max_results) is not int or not 1 <= max_results <= 100:
            raise ValueError("MaxResults must be 1..100")
        next_token = body.get("NextToken")
        return cls(body["ServiceCode"], term_matches, max_results, next_token if isinstance(next_token, str) else None)

    def matches(self, product: dict[str, Any]) -> bool:
        fields = {**product["product"]["attributes"], "productFamily": product["product"]["productFamily"]}
        return all(fields.get(field) == value for field, value in self.term_matches)


def ec2_price_list(prices: dict[str, float]) -> list[dict[str, Any]]:
    """The lab's AmazonEC2 price list: PRICE_VARIANTS for every type in on_demand_prices, in REGION only."""
    return [
        ec2_product(instance_type, price * factor, os_name, tenancy, software, capacity, usage)
        for instance_type, price in sorted(prices.items())
        for os_name, tenancy, software, capacity, usage, factor in PRICE_VARIANTS
    ]


def ec2_product(
    instance_type: str, price: float, os_name: str, tenancy: str, software: str, capacity: str, usage: str
) -> dict[str, Any]:
    """One product with its on-demand term, in the shape the real price list has (trimmed attributes)."""
    attributes = {
        "instanceType": instance_type,
        "regionCode": REGION,
        "location": "US East (N. Virginia)",
        "locationType": "AWS Region",
        "operatingSystem": os_name,
        "tenancy": tenancy,
        "preInstalledSw": software,
        "capacitystatus": capacity,
        "licenseModel": "No License required",
        "usagetype": f"{usage}:{instance_type}",
        "operation": "RunInstances" if os_name == "Linux" else "RunInstances:0002",
        "marketoption": "OnDemand",
        "servicecode": "AmazonEC2",
        "servicename": "Amazon Elastic Compute Cloud",
    }
    if instance_type in INSTANCE_SPECS:
        vcpu, memory, family = INSTANCE_SPECS[instance_type]
        attributes.update(vcpu=vcpu, memory=memory, instanceFamily=family)
    digest = hashlib.sha256(json.dumps(attributes, sort_keys=True).encode()).digest()
    sku = base64.b32encode(digest).decode()[:16]  # stable across calls and lab runs
    term = f"{sku}.{ON_DEMAND_TERM_CODE}"
    rate = f"{term}.{HOURLY_RATE_CODE}"
    dimension = {
        "unit": "Hrs",
        "endRange": "Inf",
        "description": f"${price:.4f} per On Demand {os_name} {instance_type} Instance Hour",
        "appliesTo": [],
        "rateCode": rate,
        "beginRange": "0",
        "pricePerUnit": {"USD": f"{price:.10f}"},
    }
    return {
        "product": {"productFamily": "Compute Instance", "attributes": attributes, "sku": sku},
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": {
                term: {
                    "priceDimensions": {rate: dimension},
                    "sku": sku,
                    "effectiveDate": "2024-06-01T00:00:00Z",
                    "offerTermCode": ON_DEMAND_TERM_CODE,
                    "termAttributes": {},
                }
            }
        },
        "version": "20240601000000",
        "publicationDate": "2024-06-01T00:00:00Z",
    }


# --------------------------------------------------------------------------
# Lab state
# --------------------------------------------------------------------------


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequest(f"config key '{key}': expected a number >= 0, got {value!r}")
    return float(value)


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def validate(key: str, value: Any) -> str:
        if value not in choices:
            raise BadRequest(f"config key '{key}': expected one of {list(choices)}, got {value!r}")
        return value

    return validate


def _scores(key: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(az, str) and type(score) is int and 1 <= score <= 10 for az, score in value.items()
    ):
        raise BadRequest(f"config key '{key}': expected a map of availability zone to an integer 1..10")
    return dict(value)


def _prices(key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and not isinstance(price, bool) and isinstance(price, (int, float)) and price > 0
        for name, price in value.items()
    ):
        raise BadRequest(f"config key '{key}': expected a map of name to a price in USD per hour > 0")
    return {name: float(price) for name, price in value.items()}


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"config key '{key}': expected true or false, got {value!r}")
    return value


def _optional_number(key: str, value: Any) -> float | None:
    return None if value is None else _number(key, value)


def _throttle(key: str, value: Any) -> dict[str, dict[str, float]] | None:
    """null, "ec2" (EC2's own limits) or {family: {"burst": n >= 1, "per_s": n > 0}}, stored in that last
    form so GET /_lab/config shows the numbers in force. A family left out is not throttled."""
    if value is None:
        return None
    if value == "ec2":
        return {family: dict(bucket) for family, bucket in EC2_THROTTLE.items()}
    if not isinstance(value, dict):
        raise BadRequest(f"config key '{key}': expected null, \"ec2\" or a map of family to bucket, got {value!r}")
    buckets: dict[str, dict[str, float]] = {}
    for family, bucket in value.items():
        where = f"config key '{key}', family '{family}'"
        if family not in THROTTLE_FAMILIES:
            raise BadRequest(f"{where}: unknown family, expected some of {list(THROTTLE_FAMILIES)}")
        if not isinstance(bucket, dict) or set(bucket) != {"burst", "per_s"}:
            raise BadRequest(f"{where}: expected exactly {{\"burst\": …, \"per_s\": …}}, got {bucket!r}")
        burst, per_s = bucket["burst"], bucket["per_s"]
        numbers = all(not isinstance(n, bool) and isinstance(n, (int, float)) for n in (burst, per_s))
        if not numbers or burst < 1 or per_s <= 0:
            raise BadRequest(f"{where}: expected burst >= 1 and per_s > 0, got {bucket!r}")
        buckets[family] = {"burst": float(burst), "per_s": float(per_s)}
    return buckets


CONFIG_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "boot_delay_s": _number,
    "status_ok_delay_s": _number,
    "terminate_delay_s": _number,
    "console_lag_s": _number,
    "console_mode": _choice(CONSOLE_MODES),
    "status_mode": _choice(STATUS_MODES),
    "address_mode": _choice(ADDRESS_MODES),
    "ssh_start_delay_s": _number,
    "ssh_refuse_s": _number,
    "spot_mode": _choice(SPOT_MODES),
    "spot_fulfill_delay_s": _number,
    "placement_scores": _scores,
    "visibility_delay_s": _number,
    "spot_prices": _prices,
    "on_demand_prices": _prices,
    "spot_cancel_race": _flag,
    "spot_reclaim_after_running_s": _optional_number,
    "spot_reclaim_notice_s": _number,
    "throttle": _throttle,
}


def validate_config(changes: Any) -> dict[str, Any]:
    if not isinstance(changes, dict):
        raise BadRequest("config: expected a JSON object")
    unknown = sorted(set(changes) - set(CONFIG_VALIDATORS))
    if unknown:
        raise BadRequest(f"unknown config key '{unknown[0]}'")
    return {key: CONFIG_VALIDATORS[key](key, value) for key, value in changes.items()}


# The JSON body of POST /_lab/faults: key -> accepted type(s). `count` becomes FaultRule.remaining.
FAULT_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "action": str,
    "count": int,
    "code": str,
    "http_status": int,
    "message": str,
    "subnet_id": str,
    "availability_zone": str,
    "latency_ms": (int, float),
    "drop_connection": bool,
    "when": str,
}


@dataclasses.dataclass
class FaultRule:
    action: str
    remaining: int = 1
    code: str | None = None
    http_status: int | None = None
    message: str | None = None
    subnet_id: str | None = None
    availability_zone: str | None = None
    latency_ms: float = 0.0
    drop_connection: bool = False
    # "before": the call never reaches moto. "after": moto runs it (the instance
    # exists), then the fault replaces the answer, as when a response is lost.
    when: str = "before"

    @classmethod
    def parse(cls, body: Any) -> FaultRule:
        if not isinstance(body, dict):
            raise BadRequest("fault: expected a JSON object")
        for key, value in body.items():
            expected = FAULT_FIELD_TYPES.get(key)
            if expected is None:
                raise BadRequest(f"unknown fault key '{key}'")
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise BadRequest(f"fault key '{key}': wrong type {type(value).__name__}")
        if "action" not in body:
            raise BadRequest("fault key 'action' is required")
        fields = dict(body)
        rule = cls(remaining=fields.pop("count", 1), **fields)
        if rule.remaining < 1 or rule.latency_ms < 0 or rule.when not in ("before", "after"):
            raise BadRequest("fault: count must be >= 1, latency_ms >= 0, when 'before' or 'after'")
        if not (rule.code or rule.http_status or rule.latency_ms or rule.drop_connection):
            raise BadRequest("fault: give at least one of code, http_status, latency_ms, drop_connection")
        return rule

    def matches(self, action: str, subnet_id: str | None, availability_zone: str | None) -> bool:
        return (
            self.action == action
            and self.subnet_id in (None, subnet_id)
            and self.availability_zone in (None, availability_zone)
        )

    def error_response(self, json_protocol: bool = False) -> Response | None:
        """The injected error, in the protocol of the faulted call: EC2's XML, or awsJson for GetProducts."""
        if self.code:
            build = json_error_response if json_protocol else ec2_error_response
            return build(self.code, self.message, self.http_status)
        if self.http_status:
            return Response(b"", status=self.http_status)  # a bare server error, no EC2 XML
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Interruption:
    """A spot interruption notice for one instance, and the reclaim it announces."""

    action: str  # one of INTERRUPTION_ACTIONS
    reclaim_at: float  # time.monotonic() when the lab takes the instance back
    time_utc: str  # reclaim_at as IMDS shows it
    terminate_delay_s: float  # snapshotted when the notice is given, as for TerminateInstances
    done: bool = False

    def notice(self) -> dict[str, str]:
        """The IMDS spot/instance-action document."""
        return {"action": self.action, "time": self.time_utc}


@dataclasses.dataclass
class InstanceTimeline:
    """When a launched instance reaches each state; fixed from the config at launch/terminate time."""

    instance: Instance
    running_at: float
    status_ok_at: float
    console_at: float
    visible_at: float
    # What the status checks turn into at status_ok_at, and that moment in UTC (EC2's ImpairedSince).
    status_mode: str
    status_settled_utc: datetime.datetime
    terminated_at: float | None = None
    # spot_reclaim_after_running_s: when this spot instance gets its interruption notice (None: never),
    # and how long the notice runs (spot_reclaim_notice_s).
    reclaim_notice_at: float | None = None
    reclaim_notice_s: float = 120.0
    interruption: Interruption | None = None
    # Lab.advance skips the timeline until time.monotonic() is past this: the first of its moments
    # still to come (-inf: advance at once, after any change; inf: nothing about it changes again).
    due: float = -math.inf

    def next_due(self, now: float) -> float:
        """The first moment not yet past (state() and checks() compare strictly) at which advancing
        may change the instance; inf when none is left."""
        moments = [self.running_at, self.status_ok_at]
        if self.terminated_at is not None:
            moments.append(self.terminated_at)
        if self.reclaim_notice_at is not None and self.interruption is None:
            moments.append(self.reclaim_notice_at)
        if self.interruption is not None and not self.interruption.done:
            moments.append(self.interruption.reclaim_at)
        return min((m for m in moments if m >= now), default=math.inf)

    def shift(self, delta_s: float) -> None:
        """Moves the whole boot timeline, for a spot launch fulfilled earlier than planned (the cancel race)."""
        self.running_at += delta_s
        self.status_ok_at += delta_s
        self.console_at += delta_s
        settled = self.status_settled_utc + datetime.timedelta(seconds=delta_s)
        self.status_settled_utc = settled.replace(microsecond=0)
        if self.reclaim_notice_at is not None:
            self.reclaim_notice_at += delta_s
        self.due = -math.inf

    def state(self, now: float) -> tuple[str, int]:
        # Strict comparisons: even with zero delays the RunInstances answer says
        # pending and the TerminateInstances one shutting-down, as EC2's do.
        if self.terminated_at is not None:
            return TERMINATED if now > self.terminated_at else SHUTTING_DOWN
        return RUNNING if now > self.running_at else PENDING

    def checks(self, now: float) -> str:
        """A key of STATUS_CHECKS."""
        return self.status_mode if now > self.status_ok_at else "initializing"


def throttle_family(action: str) -> str:
    """The EC2 rate-limit bucket an action draws from (a key of THROTTLE_FAMILIES)."""
    if action == "RunInstances":
        return "run_instances"
    if action.startswith(("Describe", "Get", "List")):
        return "describe"
    return "mutating"


@dataclasses.dataclass
class TokenBucket:
    """One of EC2's request token buckets. It refills continuously rather than in ticks, so
    `tokens` is only exact at `updated_at`; `level` gives the count at any later moment."""

    burst: float
    per_s: float
    tokens: float
    updated_at: float  # time.monotonic()

    @classmethod
    def full(cls, burst: float, per_s: float, now: float) -> TokenBucket:
        return cls(burst=burst, per_s=per_s, tokens=burst, updated_at=now)

    def level(self, now: float) -> float:
        return min(self.burst, self.tokens + (now - self.updated_at) * self.per_s)

    def take(self, now: float) -> bool:
        """Spends one token if there is a whole one; an empty bucket is left as it is."""
        self.tokens, self.updated_at = self.level(now), now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def full_buckets(throttle: dict[str, dict[str, float]] | None) -> dict[str, TokenBucket]:
    now = time.monotonic()
    return {family: TokenBucket.full(b["burst"], b["per_s"], now) for family, b in (throttle or {}).items()}


@dataclasses.dataclass
class TokenRecord:
    fingerprint: tuple[tuple[str, str], ...]
    reservation: Any


@dataclasses.dataclass
class SpotTimeline:
    request: SpotInstanceRequest
    fulfill_at: float
    # A RunInstances spot launch: its instance exists (pending) from the launch on, and the request
    # only waits for fulfill_at. None for RequestSpotInstances, whose instance is launched at fulfilment.
    instance: Instance | None = None


class Lab:
    """All lab state. Every method takes `lock`, which is re-entrant because moto calls back into the lab."""

    def __init__(
        self,
        backend: EC2Backend,
        config: dict[str, Any],
        host_keys: list[HostKey],
        mitm_keys: list[HostKey],
        authorized_keys_path: Path,
    ):
        self.lock = threading.RLock()
        # Guards what the SSH gate reads per connection (ssh_mode, last_launch_at and the config's
        # SSH windows), so an accept never waits on `lock`, which each moto call holds. Taken
        # inside `lock` where both are needed, never the other way round.
        self.gate_lock = threading.Lock()
        self.backend = backend
        self.config = config
        self.host_keys = host_keys
        self.mitm_keys = mitm_keys
        self.authorized_keys_path = authorized_keys_path
        # sshd's key list: the keys of the instances still alive, as each EC2 instance's own list
        # holds its launch key until it is gone. sshd parses the whole file at each login.
        self.authorized_keys: dict[tuple[str, str], str] = {}  # (type, blob) -> line
        self.key_of_instance: dict[str, tuple[str, str]] = {}
        self.key_users: collections.Counter[tuple[str, str]] = collections.Counter()
        self.faults: list[FaultRule] = []
        self.counters: collections.Counter[str] = collections.Counter()
        # Requests refused by the `throttle` buckets, per action. Apart from `counters`, which still
        # counts them as calls EC2 received.
        self.throttled: collections.Counter[str] = collections.Counter()
        self.buckets: dict[str, TokenBucket] = full_buckets(config.get("throttle"))
        self.instances: dict[str, InstanceTimeline] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self.spot_requests: dict[str, SpotTimeline] = {}
        # The latest interruption notice of any instance: what IMDS answers without X-Acode-Instance-Id.
        self.instance_action: dict[str, str] | None = None
        self.last_launch_at: float | None = None
        self.passed_type_checks: set[tuple[Any, Any, Any]] = set()  # see launch
        self.latest_instance_id: str | None = None
        self.imds_tokens: dict[str, float] = {}
        # The latest change of spot_prices: the time of the newest DescribeSpotPriceHistory point.
        self.spot_prices_at = utc_now().replace(microsecond=0)
        self.ssh_mode = "auto"  # POST /_lab/ssh; "auto" leaves the gate to the launch-timed windows
        # The SSH gate's hooks: apply a mode change at once (settle: and wait until it holds;
        # never under `gate_lock`), and cut the sessions it carries.
        self.on_gate_change: Callable[[], None] = lambda: None
        self.settle_gate: Callable[[], None] = lambda: None
        self.drop_ssh_sessions: Callable[[], int] = lambda: 0
        authorized_keys_path.write_text("")
        authorized_keys_path.chmod(0o600)

    # -- config, counters, faults ------------------------------------------

    def update_config(self, changes: Any) -> dict[str, Any]:
        valid = validate_config(changes)
        with self.lock:
            if "spot_prices" in valid and valid["spot_prices"] != self.config["spot_prices"]:
                self.spot_prices_at = utc_now().replace(microsecond=0)
            with self.gate_lock:
                self.config.update(valid)
            if "throttle" in valid:
                # Every setting starts full buckets, as a fresh account would have.
                self.buckets = full_buckets(valid["throttle"])
            log.info("config updated: %s", valid)
            return self.config_snapshot()

    def config_snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.config))

    def count(self, action: str) -> None:
        with self.lock:
            self.counters[action] += 1

    def admit(self, action: str) -> bool:
        """Takes a token from the action's `throttle` bucket; False (and counted) when it is empty."""
        with self.lock:
            bucket = self.buckets.get(throttle_family(action))
            if bucket is None or bucket.take(time.monotonic()):
                return True
            self.throttled[action] += 1
            log.info("throttled %s (%s bucket empty)", action, throttle_family(action))
            return False

    def throttle_view(self) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            return {
                "config": self.config_snapshot()["throttle"],
                "throttled": dict(self.throttled),
                "tokens": {family: bucket.level(now) for family, bucket in self.buckets.items()},
            }

    def add_fault(self, rule: FaultRule) -> None:
        with self.lock:
            self.faults.append(rule)
            log.info("fault added: %s", rule)

    def take_fault(self, action: str, form: dict[str, str]) -> FaultRule | None:
        """The first rule matching this call, with one use consumed."""
        subnet_id = form.get("SubnetId") or form.get("NetworkInterface.1.SubnetId") or form.get(
            "LaunchSpecification.SubnetId"
        )
        with self.lock:
            if not any(rule.action == action for rule in self.faults):
                return None
            zone = self._request_zone(form, subnet_id)
            for rule in self.faults:
                if rule.matches(action, subnet_id, zone):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self.faults.remove(rule)
                    log.info("fault fires on %s: %s", action, rule)
                    return rule
        return None

    def _request_zone(self, form: dict[str, str], subnet_id: str | None) -> str | None:
        zone = form.get("Placement.AvailabilityZone") or form.get("LaunchSpecification.Placement.AvailabilityZone")
        if zone or not subnet_id:
            return zone
        try:
            return self.backend.get_subnet(subnet_id).availability_zone
        except Exception:  # moto raises InvalidSubnetIdError; the call itself will report it
            return None

    # -- the timeline --------------------------------------------------------

    def advance(self) -> None:
        """Brings moto's objects up to date with the lab timeline; runs before every EC2 call."""
        now = time.monotonic()
        with self.lock:
            # A check per instance, not an update: with thousands launched this runs on every call.
            for timeline in list(self.instances.values()):
                if now > timeline.due:
                    self._advance_instance(timeline, now)
            for spot in list(self.spot_requests.values()):
                self._advance_spot(spot, now)

    def _advance_instance(self, timeline: InstanceTimeline, now: float) -> None:
        self._apply(timeline, now)
        due = timeline.reclaim_notice_at
        if due is not None and timeline.interruption is None and now > due and timeline.instance.state == "running":
            request = self._spot_request_of(timeline.instance)
            action = request.instance_interruption_behaviour if request is not None else "terminate"
            # Dated from when it was due, not from this (lazy) call, so the timeline is exact.
            self._give_notice(timeline, action, timeline.reclaim_notice_s, due)
        interruption = timeline.interruption
        if interruption is not None and not interruption.done and now > interruption.reclaim_at:
            self._reclaim(timeline, interruption)
            self._apply(timeline, now)
        timeline.due = timeline.next_due(now)

    def _apply(self, timeline: InstanceTimeline, now: float) -> None:
        instance = timeline.instance
        if instance.state in ("stopping", "stopped"):
            return  # moto's own stop/start; the lab does not model them
        name, code = timeline.state(now)
        if instance.state != name:
            # A new object, never an in-place edit: moto threads may be serializing the old one.
            instance._state = InstanceState(name, code)
        instance.lab_checks = timeline.checks(now)
        instance.lab_checks_since = timeline.status_settled_utc

    def _advance_spot(self, spot: SpotTimeline, now: float) -> None:
        request = spot.request
        if request.state != "open":
            return
        if spot.instance is not None:
            # A RunInstances launch passed the spot_mode check when it was made; only the delay is left.
            if self.instances[spot.instance.id].terminated_at is not None:
                # Terminated by the client while waiting: nothing left to fulfil.
                request.state = "closed"
                self._set_spot_status(request, "instance-terminated-by-user")
            elif now > spot.fulfill_at:
                self._fulfil(request, spot.instance)
            else:
                self._set_spot_status(request, "pending-fulfillment")
            return
        mode = self.config["spot_mode"]
        if mode != "fulfilled":
            self._set_spot_status(request, mode)
        elif now > spot.fulfill_at:
            self._fulfil(request, self._launch_for(request))
        else:
            self._set_spot_status(request, "pending-fulfillment")

    def _launch_for(self, request: SpotInstanceRequest) -> Instance:
        """Launches a RequestSpotInstances request's instance (moto's launch_instance, held back until now)."""
        request.lab_release = True
        instance = request.launch_instance()
        instance.spot_instance_request_id = request.id  # EC2 shows it in DescribeInstances; moto does not
        return instance

    def _fulfil(self, request: SpotInstanceRequest, instance: Instance) -> None:
        request.instance = instance
        request.state = "active"
        self._set_spot_status(request, "fulfilled")
        log.info("spot request %s fulfilled by %s", request.id, instance.id)

    def _spot_request_of(self, instance: Instance) -> SpotInstanceRequest | None:
        request_id = getattr(instance, "spot_instance_request_id", None)
        return self.backend.spot_instance_requests.get(request_id) if request_id else None

    @staticmethod
    def _set_spot_status(request: SpotInstanceRequest, code: str) -> None:
        request._status_code = code
        request.status_message = SPOT_STATUS[code]

    # -- hooks called from inside moto ----------------------------------------

    def launch(self, run: Callable[..., Any], backend: EC2Backend, args: tuple, kwargs: dict) -> Any:
        """Wraps moto's run_instances: idempotency, pending state, spot refusals, key install."""
        form = take_launch_form()
        token = form.get("ClientToken") if form else None
        with self.lock:
            if token and token in self.tokens:
                return self._replay(self.tokens[token], request_fingerprint(form))
            if form and form.get("InstanceMarketOptions.MarketType") == "spot":
                self._refuse_spot_launch()
            # moto checks a named type against every offering of the region on each launch (a
            # twentieth of a launch's time). A check that passed once for this region, placement
            # and type passes again, so the flag that skips it is set; without a launch template
            # it does nothing else. (moto raises on a failed check only when its
            # EC2_ENABLE_INSTANCE_TYPE_VALIDATION is set.)
            type_check = (kwargs.get("region_name"), kwargs.get("placement"), kwargs.get("instance_type"))
            checks_type = not kwargs.get("is_instance_type_default") and not kwargs.get("launch_template")
            if checks_type and type_check in self.passed_type_checks:
                kwargs["is_instance_type_default"] = True
            reservation = run(backend, *args, **kwargs)
            if checks_type:
                self.passed_type_checks.add(type_check)
            now = time.monotonic()
            for instance in reservation.instances:
                instance.client_token = token  # moto 5.2.5 stores "ABCDE" when no token was sent
                # Before the answer is serialized, so RunInstances already shows the mode's addresses.
                apply_address_mode(instance, self.config["address_mode"])
                # A RunInstances spot launch boots once its request is fulfilled.
                spot_launch = form is not None and instance.lifecycle == "spot"
                fulfill_at = now + (self.config["spot_fulfill_delay_s"] if spot_launch else 0.0)
                self._track(instance, now, boot_from=fulfill_at)
                if spot_launch:
                    self._attach_spot_request(backend, instance, form, fulfill_at, now)
            if token:
                self.tokens[token] = TokenRecord(request_fingerprint(form), reservation)
            with self.gate_lock:
                self.last_launch_at = now
            self.on_gate_change()
            self._install_key(backend, kwargs.get("key_name"), reservation.instances)
            log.info("launched %s (token %s)", [i.id for i in reservation.instances], token)
            return reservation

    def _replay(self, record: TokenRecord, fingerprint: tuple) -> Any:
        if record.fingerprint != fingerprint:
            raise Ec2HttpError(
                "IdempotentParameterMismatch",
                "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
            )
        if any(i.state in ("shutting-down", "terminated") for i in record.reservation.instances):
            raise Ec2HttpError(
                "IdempotentInstanceTerminated",
                "The client token has already been used for an instance that has been terminated.",
            )
        return record.reservation

    def _refuse_spot_launch(self) -> None:
        refusal = SPOT_LAUNCH_ERRORS.get(self.config["spot_mode"])
        if refusal:
            raise Ec2HttpError(*refusal)

    def _track(self, instance: Instance, now: float, boot_from: float) -> None:
        running_at = boot_from + self.config["boot_delay_s"]
        status_ok_at = running_at + self.config["status_ok_delay_s"]
        settled_utc = utc_now() + datetime.timedelta(seconds=status_ok_at - now)
        reclaim_after_s = self.config["spot_reclaim_after_running_s"]
        timeline = InstanceTimeline(
            instance,
            running_at=running_at,
            status_ok_at=status_ok_at,
            console_at=running_at + self.config["console_lag_s"],
            visible_at=now + self.config["visibility_delay_s"],
            status_mode=self.config["status_mode"],
            status_settled_utc=settled_utc.replace(microsecond=0),
        )
        if instance.lifecycle == "spot" and reclaim_after_s is not None:  # on-demand instances are never reclaimed
            timeline.reclaim_notice_at = running_at + reclaim_after_s
            timeline.reclaim_notice_s = self.config["spot_reclaim_notice_s"]
        self.instances[instance.id] = timeline
        self.latest_instance_id = instance.id
        self._apply(timeline, now)

    def _attach_spot_request(
        self, backend: EC2Backend, instance: Instance, form: dict[str, str], fulfill_at: float, now: float
    ) -> None:
        """EC2 backs a RunInstances spot launch with a one-time spot request; moto 5.2.5 does not.

        The request is fulfilled at once without spot_fulfill_delay_s; with it, the request stays
        open/pending-fulfillment and the instance pending until fulfill_at.
        """
        request = SpotInstanceRequest(
            ec2_backend=backend,
            spot_request_id=random_spot_request_id(),
            price=form.get("InstanceMarketOptions.SpotOptions.MaxPrice"),
            image_id=instance.image_id,
            spot_instance_type=form.get("InstanceMarketOptions.SpotOptions.SpotInstanceType", "one-time"),
            valid_from=None,
            valid_until=None,
            launch_group=None,
            availability_zone_group=None,
            key_name=instance.key_name,
            security_groups=[],
            user_data=None,
            instance_type=instance.instance_type,
            placement=instance.placement.zone,
            kernel_id=None,
            ramdisk_id=None,
            monitoring_enabled=False,
            subnet_id=instance.subnet_id,
            tags={},
            spot_fleet_id=None,
            instance_interruption_behaviour=form.get("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"),
        )
        backend.spot_instance_requests[request.id] = request
        instance.spot_instance_request_id = request.id
        if fulfill_at <= now:
            self._fulfil(request, instance)
            return
        request.state = "open"
        self._set_spot_status(request, "pending-fulfillment")
        self.spot_requests[request.id] = SpotTimeline(request, fulfill_at, instance)

    def _install_key(self, backend: EC2Backend, key_name: str | None, instances: list[Instance]) -> None:
        """Adds the key pair's public key to sshd's authorized_keys, as cloud-init would."""
        key_pair = backend.key_pairs.get(key_name) if key_name else None
        if key_pair is None:
            return
        key_type, blob = key_pair.public_key.split()[:2]
        key = (key_type, blob)
        for instance in instances:
            self.key_of_instance[instance.id] = key
            self.key_users[key] += 1
        if key not in self.authorized_keys:
            self.authorized_keys[key] = f"{key_type} {blob} {key_name}"
            self._write_authorized_keys()

    def _retire_key(self, instance_id: str) -> None:
        """The instance is going: its key stays only while another live instance has it."""
        key = self.key_of_instance.pop(instance_id, None)
        if key is None:
            return
        self.key_users[key] -= 1
        if self.key_users[key] <= 0:
            del self.key_users[key]
            self.authorized_keys.pop(key, None)
            self._write_authorized_keys()

    def _write_authorized_keys(self) -> None:
        """Newest first: sshd parses lines only up to the one that matches, and an instance is
        logged into soon after its launch. That keeps a login's cost near an EC2 instance's, whose
        file holds its one key, without changing which keys are accepted."""
        staging = self.authorized_keys_path.with_suffix(".tmp")
        staging.write_text("".join(line + "\n" for line in reversed(self.authorized_keys.values())))
        staging.chmod(0o600)
        os.replace(staging, self.authorized_keys_path)

    def hidden(self, instance_id: str) -> bool:
        """EC2's eventual consistency: a new instance is unknown to Describe and Terminate for a while."""
        timeline = self.instances.get(instance_id)
        return timeline is not None and time.monotonic() < timeline.visible_at

    def check_visible(self, instance_ids: list[str]) -> None:
        unseen = [i for i in instance_ids if self.hidden(i)]
        if unseen:
            raise Ec2HttpError(
                "InvalidInstanceID.NotFound", f"The instance ID '{unseen[0]}' does not exist"
            )

    def begin_termination(self, results: list[tuple[Instance, InstanceState]]) -> None:
        """moto 5.2.5 terminates at once; the lab turns that into shutting-down, then terminated."""
        now = time.monotonic()
        with self.lock:
            for instance, _previous in results:
                timeline = self.instances.get(instance.id)
                if timeline is None:
                    continue
                if timeline.terminated_at is None:
                    timeline.terminated_at = now + self.config["terminate_delay_s"]
                    timeline.due = -math.inf
                    self._retire_key(instance.id)
                self._apply(timeline, now)

    def track_spot_requests(self, requests: list[SpotInstanceRequest]) -> None:
        now = time.monotonic()
        with self.lock:
            for request in requests:
                request.state = "open"
                self._set_spot_status(request, "pending-evaluation")
                self.spot_requests[request.id] = SpotTimeline(request, now + self.config["spot_fulfill_delay_s"])

    def cancel_spot_requests(self, backend: EC2Backend, request_ids: list[str]) -> list[SpotInstanceRequest]:
        """Keeps cancelled requests visible as `cancelled` (moto 5.2.5 deletes them)."""
        with self.lock:
            missing = [rid for rid in request_ids if rid not in backend.spot_instance_requests]
            if missing:
                raise Ec2HttpError(
                    "InvalidSpotInstanceRequestID.NotFound",
                    f"The spot instance request ID '{missing[0]}' does not exist",
                )
            requests = [backend.spot_instance_requests[rid] for rid in request_ids]
            now = time.monotonic()
            for request in requests:
                if request.state == "open":
                    self._cancel_open(request, now)
                elif request.state == "active":
                    self._set_spot_status(request, "request-canceled-and-instance-running")
                request.state = "cancelled"
            return requests

    def _cancel_open(self, request: SpotInstanceRequest, now: float) -> None:
        """Cancels a request that is not fulfilled yet. Its pending RunInstances instance goes too, unless
        spot_cancel_race lets the fulfilment win: then the instance launches (or boots) now and runs on,
        and only a client that also terminates it gets rid of it."""
        spot = self.spot_requests.get(request.id)
        pending = spot.instance if spot is not None else None
        # Without capacity nothing can win the race; a RunInstances launch passed that check already.
        race = self.config["spot_cancel_race"] and (pending is not None or self.config["spot_mode"] == "fulfilled")
        if race:
            if pending is not None:
                self.instances[pending.id].shift(min(0.0, now - spot.fulfill_at))
                request.instance = pending
            else:
                request.instance = self._launch_for(request)
            self._set_spot_status(request, "request-canceled-and-instance-running")
            log.info("spot request %s cancelled, but %s won the race", request.id, request.instance.id)
            return
        self._set_spot_status(request, "canceled-before-fulfillment")
        if pending is not None:
            pending.terminate()  # moto's model: releases the interfaces, as TerminateInstances does
            timeline = self.instances[pending.id]
            timeline.terminated_at = now + self.config["terminate_delay_s"]
            timeline.due = -math.inf
            self._retire_key(pending.id)
            self._apply(timeline, now)

    # -- spot interruption and IMDS -------------------------------------------

    def interrupt(self, instance_id: str | None, action: str, notice_s: float) -> dict[str, Any]:
        """POST /_lab/spot/interrupt: notices for one spot instance, or for every live one; each is
        reclaimed when its notice runs out."""
        self.advance()
        with self.lock:
            now = time.monotonic()
            targets = [self._interruptible(instance_id)] if instance_id else self._live_spot_timelines()
            requests = [self._give_notice(timeline, action, notice_s, now) for timeline in targets]
            if not instance_id:
                # As before: the IMDS answer without X-Acode-Instance-Id shows the notice even with no spot instance.
                self.instance_action = {"action": action, "time": utc_iso(utc_at(now + notice_s))}
            marked = [request.id for request in requests if request is not None]
            log.info("spot interruption: %s, marked %s", self.instance_action, marked)
            return {
                "instance_action": self.instance_action,
                "marked_requests": marked,
                "instance_ids": [timeline.instance.id for timeline in targets],
            }

    def _interruptible(self, instance_id: str) -> InstanceTimeline:
        timeline = self.instances.get(instance_id)
        if timeline is None:
            raise BadRequest(f"spot/interrupt: the lab launched no instance '{instance_id}'")
        if timeline.instance.lifecycle != "spot" or timeline.instance.state not in ("pending", "running"):
            raise BadRequest(f"spot/interrupt: '{instance_id}' is not a pending or running spot instance")
        request = self._spot_request_of(timeline.instance)
        if request is not None and request.instance is not timeline.instance:
            raise BadRequest(f"spot/interrupt: the spot request of '{instance_id}' is not fulfilled yet")
        return timeline

    def _live_spot_timelines(self) -> list[InstanceTimeline]:
        """Spot instances that a fulfilled request launched and that are still pending or running."""
        return [
            self.instances[request.instance.id]
            for request in self.backend.spot_instance_requests.values()
            if request.instance is not None
            and request.state in ("active", "cancelled")
            and request.instance.id in self.instances
            and request.instance.state in ("pending", "running")
        ]

    def _give_notice(
        self, timeline: InstanceTimeline, action: str, notice_s: float, at: float
    ) -> SpotInstanceRequest | None:
        """The interruption notice: IMDS instance-action for the instance, the request marked."""
        reclaim_at = at + notice_s
        interruption = Interruption(action, reclaim_at, utc_iso(utc_at(reclaim_at)), self.config["terminate_delay_s"])
        timeline.interruption = interruption
        timeline.due = -math.inf
        self.instance_action = interruption.notice()
        request = self._spot_request_of(timeline.instance)
        if request is not None:
            self._set_spot_status(request, "marked-for-termination" if action == "terminate" else "marked-for-stop")
        log.info("interruption notice for %s: %s", timeline.instance.id, interruption.notice())
        return request

    def _reclaim(self, timeline: InstanceTimeline, interruption: Interruption) -> None:
        """The notice ran out: EC2 takes the instance back, unless the client ended it first."""
        interruption.done = True
        instance = timeline.instance
        if timeline.terminated_at is not None or instance.state not in ("pending", "running"):
            return
        method, request_state, status = RECLAIM_OUTCOMES[interruption.action]
        getattr(instance, method)()  # moto's model, as TerminateInstances / StopInstances call it
        if method == "terminate":
            timeline.terminated_at = interruption.reclaim_at + interruption.terminate_delay_s
            self._retire_key(instance.id)
            instance.state_reason = StateReason(
                "Server.SpotInstanceTermination: Spot instance termination", "Server.SpotInstanceTermination"
            )
        request = self._spot_request_of(instance)
        if request is not None:
            if request.state == "active":
                request.state = request_state
            self._set_spot_status(request, status)
        log.info("reclaimed %s (%s)", instance.id, interruption.action)

    def imds_issue_token(self, ttl_s: int) -> str:
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.imds_tokens[token] = time.monotonic() + ttl_s
        return token

    def imds_token_valid(self, token: str | None) -> bool:
        with self.lock:
            return token is not None and self.imds_tokens.get(token, 0.0) > time.monotonic()

    def imds_get(self, path: str, instance_id: str | None) -> tuple[int, str]:
        """What the IMDS of `instance_id` answers (X-Acode-Instance-Id); without it, the lab-wide view:
        the latest notice and the latest launched instance."""
        self.advance()  # notices from spot_reclaim_after_running_s fall due without any EC2 call
        with self.lock:
            if instance_id is None:
                action, own_id = self.instance_action, self.latest_instance_id
            else:
                timeline = self.instances.get(instance_id)
                if timeline is None:
                    return 404, ""
                action = timeline.interruption.notice() if timeline.interruption else None
                own_id = instance_id
            if path == "/latest/meta-data/spot/instance-action" and action:
                return 200, json.dumps(action)
            if path == "/latest/meta-data/instance-id" and own_id:
                return 200, own_id
        return 404, ""

    # -- views -----------------------------------------------------------------

    def console_output(self, instance_id: str) -> tuple[bool, bytes | None]:
        """(known, output): output is None until console_lag_s after the instance runs."""
        with self.lock:
            timeline = self.instances.get(instance_id)
            if timeline is None:
                return False, None
            if time.monotonic() <= timeline.console_at:
                return True, None
            mode = self.config["console_mode"]
            keys = {"ok": self.host_keys, "wrong-fingerprint": self.mitm_keys}.get(mode)
            return True, render_console(instance_hostname(timeline.instance), keys)

    def ssh_gate_mode(self) -> str:
        """"closed" (refused), "reset" (accepted then reset) or "open": as set by POST /_lab/ssh, or
        in "auto" measured from the latest launch."""
        with self.gate_lock:
            return self._gate_mode_locked()

    def _gate_mode_locked(self) -> str:
        if self.ssh_mode != "auto":
            return self.ssh_mode
        if self.last_launch_at is None:
            return "open"
        age = time.monotonic() - self.last_launch_at
        if age < self.config["ssh_start_delay_s"]:
            return "closed"
        if age < self.config["ssh_refuse_s"]:
            return "reset"
        return "open"

    def set_ssh_mode(self, mode: str, drop_sessions: bool) -> dict[str, Any]:
        """POST /_lab/ssh: takes SSH down (or up) at run time, e.g. for an instance that is already Ready."""
        with self.gate_lock:
            self.ssh_mode = mode
        # The new mode holds from this answer on, not from the gate's next poll.
        self.on_gate_change()
        self.settle_gate()
        dropped = self.drop_ssh_sessions() if drop_sessions else 0
        log.info("ssh mode %s (dropped %d sessions)", mode, dropped)
        return {"mode": mode, "effective": self.ssh_gate_mode(), "dropped_sessions": dropped}

    def ssh_view(self) -> dict[str, Any]:
        with self.gate_lock:
            return {"mode": self.ssh_mode, "effective": self._gate_mode_locked()}

    def instances_view(self) -> list[dict[str, Any]]:
        self.advance()
        with self.lock:
            return [
                {
                    "instance_id": i.id,
                    "state": i.state,
                    "client_token": i.client_token,
                    "key_name": i.key_name,
                    "subnet_id": i.subnet_id,
                    # The same attributes DescribeInstances serializes, so the two always agree.
                    "private_ip": i.private_ip,
                    "public_ip": i.public_ip,
                    "tags": {t["key"]: t["value"] for t in i.get_tags()},
                    "lifecycle": i.lifecycle or "on-demand",
                }
                for i in self.backend.all_instances()
            ]

    def key_pairs_view(self) -> list[str]:
        """The key pairs' names, unfaulted and unthrottled (tests check for leaks with it)."""
        with self.lock:
            return sorted(self.backend.key_pairs)

    def placement_scores(self, form: dict[str, str]) -> Response:
        """GetSpotPlacementScores, which moto 5.2.5 does not implement."""
        if "TargetCapacity" not in form:
            return ec2_error_response("MissingParameter", "The request must contain the parameter TargetCapacity")
        with self.lock:
            scores = dict(self.config["placement_scores"])
        items = []
        if REGION in (form_values(form, "RegionName") or [REGION]):
            if form.get("SingleAvailabilityZone") == "true":
                # EC2 names zones by ID here (use1-az6), not by name (us-east-1a).
                zone_ids = {z.name: z.zone_id for z in self.backend.describe_availability_zones()}
                ranked = sorted(scores.items(), key=lambda item: -item[1])
                items = [
                    f"<item><region>{REGION}</region><availabilityZoneId>{zone_ids[az]}</availabilityZoneId>"
                    f"<score>{score}</score></item>"
                    for az, score in ranked
                    if az in zone_ids
                ]
            else:
                items = [f"<item><region>{REGION}</region><score>{max(scores.values(), default=1)}</score></item>"]
        inner = f"<spotPlacementScoreSet>{''.join(items)}</spotPlacementScoreSet>"
        return ec2_result_response("GetSpotPlacementScores", inner)

    def request_spot_price(self, request: SpotInstanceRequest) -> str | None:
        """A spot request's SpotPrice: its own maximum, else its zone's price from spot_prices."""
        if request.price:
            return request.price
        zone = request.launch_specification.availability_zone
        if not zone and request.launch_specification.subnet_id:
            zone = self._request_zone({}, request.launch_specification.subnet_id)
        with self.lock:
            price = self.config["spot_prices"].get(zone or "")
        return None if price is None else f"{price:.6f}"

    def spot_price_history(self, form: dict[str, str]) -> Response:
        """DescribeSpotPriceHistory from spot_prices (moto 5.2.5 answers one fixed price for all zones)."""
        try:
            query = SpotPriceQuery.parse(form)
        except ValueError as error:
            return ec2_error_response("InvalidParameterValue", str(error))
        with self.lock:
            prices = dict(self.config["spot_prices"])
            latest = self.spot_prices_at
            types = query.instance_types or sorted(self.config["on_demand_prices"])
        items = [
            item
            for zone, price in sorted(prices.items())
            if query.availability_zone in (None, zone)
            for instance_type in types
            for description in query.product_descriptions
            for item in spot_price_points(zone, instance_type, description, price, latest, query)
            if query.matches(item)
        ]
        # Newest first, as EC2 lists them.
        items.sort(key=lambda item: (-item["when"].timestamp(), item["availabilityZone"], item["instanceType"]))
        try:
            page, next_token = paginate(items, query.max_results, query.next_token)
        except ValueError:
            return ec2_error_response("InvalidPaginationToken", f"Invalid pagination token {query.next_token!r}")
        inner = "".join(
            "<item>" + "".join(f"<{k}>{escape(v)}</{k}>" for k, v in item.items() if k != "when") + "</item>"
            for item in page
        )
        return ec2_result_response(
            "DescribeSpotPriceHistory",
            f"<spotPriceHistorySet>{inner}</spotPriceHistorySet><nextToken>{escape(next_token or '')}</nextToken>",
        )

    def get_products(self, body: Any) -> Response:
        """The Price List API's GetProducts (service `pricing`) from on_demand_prices."""
        try:
            query = ProductQuery.parse(body)
        except ValueError as error:
            return json_error_response("InvalidParameterException", str(error))
        with self.lock:
            prices = dict(self.config["on_demand_prices"])
        products = [p for p in ec2_price_list(prices) if query.matches(p)] if query.service_code == "AmazonEC2" else []
        try:
            page, next_token = paginate(products, query.max_results, query.next_token)
        except ValueError:
            return json_error_response("InvalidNextTokenException", "The next token is invalid.")
        answer: dict[str, Any] = {"FormatVersion": "aws_v1", "PriceList": [json.dumps(p) for p in page]}
        if next_token:
            answer["NextToken"] = next_token
        return json_response(answer)


# --------------------------------------------------------------------------
# Patches of moto 5.2.5 internals
# --------------------------------------------------------------------------

_launch_request = threading.local()


@contextlib.contextmanager
def launch_request(form: dict[str, str]):
    """Hands a RunInstances form to Lab.launch, which moto calls in this same thread."""
    _launch_request.form = form
    try:
        yield
    finally:
        _launch_request.form = None


def take_launch_form() -> dict[str, str] | None:
    """The RunInstances form, once; None for moto's internal launches (spot requests)."""
    form = getattr(_launch_request, "form", None)
    _launch_request.form = None
    return form


def _status_checks(instance: Instance) -> dict[str, Any]:
    if instance.state_code != RUNNING[1]:
        return {"Status": "not-applicable"}
    checks = getattr(instance, "lab_checks", "ok")
    status, reachability = STATUS_CHECKS[checks]
    detail: dict[str, Any] = {"Name": "reachability", "Status": reachability}
    if checks == "impaired":
        detail["ImpairedSince"] = instance.lab_checks_since  # EC2 dates a failed check
    return {"Status": status, "Details": [detail]}


def install_moto_patches(lab: Lab) -> None:
    """Routes moto's EC2 model calls through the lab. Each patch targets moto 5.2.5."""
    run_instances = EC2Backend.run_instances
    terminate_instances = EC2Backend.terminate_instances
    describe_instances = EC2Backend.describe_instances
    get_reservations_by_instance_ids = EC2Backend.get_reservations_by_instance_ids
    request_spot_instances = EC2Backend.request_spot_instances
    launch_spot_instance = SpotInstanceRequest.launch_instance

    # InstanceBackend.run_instances: every launch, including spot fulfilment.
    def patched_run_instances(backend: EC2Backend, *args: Any, **kwargs: Any) -> Any:
        return lab.launch(run_instances, backend, args, kwargs)

    # InstanceBackend.terminate_instances sets `terminated` at once.
    def patched_terminate_instances(backend: EC2Backend, instance_ids: list[str]) -> Any:
        with lab.lock:
            lab.check_visible(instance_ids)
            results = terminate_instances(backend, instance_ids)
            lab.begin_termination(results)
            return results

    # SpotRequestBackend.request_spot_instances fulfils at once.
    def patched_request_spot_instances(backend: EC2Backend, *args: Any, **kwargs: Any) -> Any:
        with lab.lock:
            requests = request_spot_instances(backend, *args, **kwargs)
            lab.track_spot_requests(requests)
            return requests

    # SpotRequestBackend.cancel_spot_instance_requests deletes the requests.
    def patched_cancel_spot_instance_requests(backend: EC2Backend, request_ids: list[str]) -> Any:
        return lab.cancel_spot_requests(backend, request_ids)

    # SpotInstanceRequest.__init__ calls launch_instance(); the lab launches later,
    # when its timeline sets lab_release.
    def patched_launch_instance(request: SpotInstanceRequest) -> Instance | None:
        return launch_spot_instance(request) if getattr(request, "lab_release", False) else None

    # DescribeInstances by filter leaves out instances not visible yet; by id,
    # it answers NotFound for them, as EC2 does.
    def patched_describe_instances(backend: EC2Backend, filters: Any = None) -> Any:
        reservations = []
        for reservation in describe_instances(backend, filters):
            reservation.instances = [i for i in reservation.instances if not lab.hidden(i.id)]
            if reservation.instances:
                reservations.append(reservation)
        return reservations

    def patched_get_reservations_by_instance_ids(backend: EC2Backend, instance_ids: list[str], filters: Any = None) -> Any:
        lab.check_visible(instance_ids)
        return get_reservations_by_instance_ids(backend, instance_ids, filters)

    EC2Backend.describe_instances = patched_describe_instances
    EC2Backend.get_reservations_by_instance_ids = patched_get_reservations_by_instance_ids
    EC2Backend.run_instances = patched_run_instances
    EC2Backend.terminate_instances = patched_terminate_instances
    EC2Backend.request_spot_instances = patched_request_spot_instances
    EC2Backend.cancel_spot_instance_requests = patched_cancel_spot_instance_requests
    SpotInstanceRequest.launch_instance = patched_launch_instance
    # SpotInstanceRequest.instance_id assumes an instance exists.
    SpotInstanceRequest.instance_id = property(lambda r: r.instance.id if r.instance else None)
    # SpotInstanceRequest.spot_price is only the request's own maximum; EC2 always shows a price.
    SpotInstanceRequest.spot_price = property(lab.request_spot_price)
    # Instance.instance_status / system_status say "ok" as soon as the instance runs.
    Instance.instance_status = property(_status_checks)
    Instance.system_status = property(_status_checks)
    # The `client-token` and `instance-lifecycle` filters raise NotImplementedError
    # (HTTP 500); map them to the attributes (Lab.launch keeps client_token accurate).
    moto_ec2_utils.filter_dict_attribute_mapping["client-token"] = "client_token"
    moto_ec2_utils.filter_dict_attribute_mapping["instance-lifecycle"] = "lifecycle"
    # RunInstances answers always claim "pending"; drop that so an idempotent
    # replay shows the instance's current state (a new launch is pending anyway).
    EC2BaseResponse.RESPONSE_KEY_PATH_TO_TRANSFORMER.pop("RunInstances.Reservation.Instances.Instance.State")
    # An interface without a public IP gets an empty <association/> in instance answers;
    # EC2 leaves it out (moto already does so in DescribeNetworkInterfaces).
    EC2BaseResponse.RESPONSE_KEY_PATH_TO_TRANSFORMER[
        "Instances.Instance.NetworkInterfaces.InstanceNetworkInterface.Association"
    ] = return_if_not_empty
    # A resource's tags by a look-up of its id. moto scans every tag of every resource for each
    # resource's tags, so a tag-filtered DescribeInstances over n instances costs n²: with a few
    # thousand instances (the kill campaign, the fleet bench) the lab spent most of its time there.
    TaggedEC2Resource.get_tags = _tags_of_resource
    # moto lists a response class's methods (inspect.getmembers) on every call to find the
    # action's handler: a twentieth of the lab's time under load. A class's methods do not change.
    moto_core_responses.method_names_from_class = functools.cache(moto_core_responses.method_names_from_class)
    # get_instance walks a fresh copy of every reservation per id. The lab's timelines hold the
    # instances it launched by id; any other is found by a walk over the reservations themselves.
    def instance_by_id(backend: EC2Backend, instance_id: str) -> Instance:
        timeline = lab.instances.get(instance_id)
        if timeline is not None and timeline.instance.ec2_backend is backend:
            return timeline.instance
        return _instance_by_id(backend, instance_id)

    EC2Backend.get_instance = instance_by_id
    # So do these readers (DescribeInstanceStatus, validation); none of them changes a reservation.
    EC2Backend.all_instances = _all_instances
    EC2Backend.get_multi_instances_by_id = _multi_instances_by_id
    # A filtered DescribeInstances copied every reservation before filtering the copies.
    EC2Backend.all_reservations = _all_reservations
    # Each new Instance finds its AMI by matching a pattern against every image, and
    # run_instances checks its AMI, key pair and each new volume by a walk over all of them.
    EC2Backend.describe_images = _describe_images
    EC2Backend.describe_key_pairs = _describe_key_pairs
    EC2Backend.describe_volumes = _describe_volumes
    # Serializing an answer asks, for every member of every object written, which attribute may
    # hold it (six alias objects made and asked each time) and which of twenty transformers
    # applies to its path: a third of a moto call. Both answers are remembered.
    moto_serialize.ResponseSerializer.get_value = _remembered_get_value(moto_serialize.ResponseSerializer.get_value)
    # And wrote the document through xml.sax's generator, a call per element and attribute: a fifth
    # of a moto call. The same text, by string joins.
    moto_serialize.xmltodict = _JoinedXml()
    # A tag filter compiles a pattern per value for every instance it looks at: a sweep naming
    # 200 sessions over 2,000 instances compiled 400,000. Plain values need only a set.
    moto_ec2_utils.tag_filter_matches = _tag_filter_matches
    # The server's dispatcher lists moto's package folder (a stat per service) on every request
    # to see whether the host names a service. The folder does not change while the lab runs.
    moto_backends.list_of_moto_modules = functools.cache(lambda: tuple(_list_of_moto_modules()))


def warm_moto_backends() -> None:
    """Builds the backends moto's TerminateInstances notifies on first use. Building one reads a
    botocore service model (about half a second under the GIL), which would stall every request
    behind the lab's first TerminateInstances."""
    from moto.autoscaling import autoscaling_backends
    from moto.elbv2 import elbv2_backends

    for backends in (autoscaling_backends, elbv2_backends):
        _ = backends[DEFAULT_ACCOUNT_ID][REGION]


def _plain_values(values: list[str]) -> frozenset[str] | None:
    """The filter's values as a set, when none holds a character EC2's wildcards (or moto's fnmatch
    translation of them) treat specially: then matching a value is equality."""
    return _plain_value_set(tuple(values))


@functools.lru_cache(maxsize=256)
def _plain_value_set(values: tuple[str, ...]) -> frozenset[str] | None:
    return None if any(c in v for v in values for c in "*?[\\") else frozenset(values)


_moto_tag_filter_matches = moto_ec2_utils.tag_filter_matches


def _tag_filter_matches(obj: Any, filter_name: str, filter_values: list[str]) -> bool:
    """moto 5.2.5's tag_filter_matches, with a set look-up for plain values."""
    plain = _plain_values(filter_values)
    if plain is None:
        return _moto_tag_filter_matches(obj, filter_name, filter_values)
    if filter_name == "tag-key":
        tag_values = moto_ec2_utils.get_obj_tag_names(obj)
    elif filter_name == "tag-value":
        tag_values = moto_ec2_utils.get_obj_tag_values(obj)
    elif filter_name.startswith("tag:"):
        tag_values = moto_ec2_utils.get_obj_tag_values(obj, key=filter_name[4:])
    else:
        tag_values = [moto_ec2_utils.get_obj_tag(obj, filter_name) or ""]
    return any(value in plain for value in tag_values)


def _all_reservations(backend: EC2Backend, filters: Any = None) -> list[Any]:
    """moto's all_reservations: copies, which callers narrow to the instances they want, but only
    of the reservations that have one (an `instance-id` filter of plain ids picks them by set)."""
    reservations = list(backend.reservations.values())
    if filters is None:
        return [copy.copy(r) for r in reservations]
    ids = _plain_values(filters.get("instance-id") or ["*"])
    if ids is not None:
        reservations = [r for r in reservations if any(i.id in ids for i in r.instances)]
    passes = moto_ec2_utils.passes_filter_dict
    reservations = [r for r in reservations if any(passes(i, filters) for i in r.instances)]
    return moto_ec2_utils.filter_reservations([copy.copy(r) for r in reservations], filters)


_moto_describe_images = EC2Backend.describe_images
_list_of_moto_modules = moto_backends.list_of_moto_modules


def _describe_images(
    backend: EC2Backend,
    ami_ids: list[str] | None = None,
    filters: dict[str, Any] | None = None,
    exec_users: list[str] | None = None,
    owners: list[str] | None = None,
) -> list[Any]:
    """moto's describe_images; the look-ups of one image by a plain `image-id` filter, which every
    Instance makes of its AMI, and of one known id, which run_instances makes, by key instead of
    by a walk over every image."""
    known = _one_known(backend.amis, ami_ids, filters or exec_users or owners)
    if known is not None:
        return known
    wanted = (filters or {}).get("image-id")
    one_plain_id = isinstance(wanted, str) and _plain_values([wanted]) is not None
    if one_plain_id and list(filters or {}) == ["image-id"] and not (ami_ids or exec_users or owners):
        ami = backend.amis.get(wanted)
        return [ami] if ami is not None else []
    return _moto_describe_images(backend, ami_ids, filters, exec_users, owners)


_moto_describe_key_pairs = EC2Backend.describe_key_pairs
_moto_describe_volumes = EC2Backend.describe_volumes


def _one_known(objects: dict[str, Any], keys: list[str] | None, narrowed: Any) -> list[Any] | None:
    """What moto's walk over `objects` answers for a single known key with nothing else narrowing
    the answer (`narrowed` falsy), by look-up; None when the walk must answer (unknown keys raise
    moto's own errors there)."""
    if not keys or len(keys) != 1 or narrowed:
        return None
    found = objects.get(keys[0])
    return None if found is None else [found]


def _describe_key_pairs(backend: EC2Backend, key_names: list[str], filters: Any = None) -> list[Any]:
    """moto's describe_key_pairs; one known name by key (moto keys them by name)."""
    known = _one_known(backend.key_pairs, key_names, filters)
    return known if known is not None else _moto_describe_key_pairs(backend, key_names, filters)


def _describe_volumes(backend: EC2Backend, volume_ids: list[str] | None = None, filters: Any = None) -> list[Any]:
    """moto's describe_volumes; one known id by key."""
    known = _one_known(backend.volumes, volume_ids, filters)
    return known if known is not None else _moto_describe_volumes(backend, volume_ids, filters)


def _remembered_get_value(get_value: Callable[..., Any]) -> Callable[..., Any]:
    """moto's ResponseSerializer.get_value with the XFormedAttributePicker every answer is written
    with, worked out once per question. Which attributes may hold a member depends only on the
    picker's alias providers, the object's class (its name, its Meta), the key and the member's
    shape with its parent; which transformer applies, only on the member's path (the lab changes
    the transformers only before the first answer). Other pickers go to moto's own code."""
    possible_keys: dict[tuple[Any, ...], tuple[str, ...]] = {}
    transforms: dict[tuple[int, str], Callable[[Any], Any] | None] = {}
    kept: dict[int, Any] = {}  # the transformer maps, so their ids stay theirs

    def remembered_get_value(serializer: Any, value: Any, key: str, shape: Any) -> Any:
        picker = serializer._value_picker
        if type(picker) is not XFormedAttributePicker:
            return get_value(serializer, value, key, shape)
        question = (
            tuple(picker.alias_providers),
            type(value),
            getattr(value, "Meta", None),
            key,
            shape,
            getattr(shape, "parent", None),
        )
        keys = possible_keys.get(question)
        if keys is None:
            context = moto_serialize.AttributePickerContext(
                obj=value,
                key=key,
                shape=shape,
                operation_model=serializer.operation_model,
                service_model=serializer.operation_model.service_model,
                key_path=".".join(serializer.path),
            )
            keys = possible_keys[question] = tuple(picker.get_possible_keys(context))
        for possible_key in keys:
            found = moto_serialize.get_value(value, possible_key, moto_serialize.MISSING)
            if found is not moto_serialize.MISSING:
                break
        else:
            found = None
        transformers = picker.response_transformers
        if not transformers:
            return found
        key_path = ".".join(serializer.path) + "." + key
        where = (id(transformers), key_path)
        if where not in transforms:
            kept[id(transformers)] = transformers
            transforms[where] = next(
                (transform for path, transform in transformers.items() if key_path.endswith(path)), None
            )
        transform = transforms[where]
        return found if transform is None else transform(found)

    return remembered_get_value


class _UnusualXml(Exception):
    """A document `_joined_xml` does not write: xmltodict does."""


class _JoinedXml:
    """Stands in for the xmltodict module in moto's serializer: `unparse` as EC2's answers call it is
    `_joined_xml`; everything else is xmltodict's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(xmltodict, name)

    @staticmethod
    def unparse(document: Any, output: Any = None, **options: Any) -> Any:
        if output is None and options == {"full_document": True, "pretty": False, "short_empty_elements": True}:
            with contextlib.suppress(_UnusualXml):
                return _joined_xml(document)
        return xmltodict.unparse(document, output, **options)


_CHECKED_XML_NAMES: set[str] = set()


def _joined_xml(document: Any) -> str:
    """xmltodict.unparse(document, full_document=True, short_empty_elements=True): elements,
    `@` attributes, `#text`, lists as repeated elements, empty lists left out, None as an empty
    element, booleans as true/false. Raises _UnusualXml for anything else (comments, namespace
    maps, bytes, several roots), which xmltodict then writes."""
    if not isinstance(document, dict) or len(document) != 1:
        raise _UnusualXml
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n']
    for key, value in document.items():
        if isinstance(value, list):
            raise _UnusualXml
        _join_element(key, value, parts)
    return "".join(parts)


def _xml_name(name: Any, kind: str) -> str:
    if name not in _CHECKED_XML_NAMES:
        if not isinstance(name, str) or name.startswith(("@", "#")):
            raise _UnusualXml
        xmltodict._validate_name(name, kind)  # its ValueError, as xmltodict raises it
        _CHECKED_XML_NAMES.add(name)
    return name


def _xml_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "__iter__"):
        raise _UnusualXml
    return str(value)


def _join_element(key: Any, value: Any, parts: list[str]) -> None:
    name = _xml_name(key, "element")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is None:
            item = {}
        elif not isinstance(item, dict):
            item = {"#text": _xml_text(item)}
        text = None
        children = []
        parts.append("<" + name)
        for child_key, child in item.items():
            if child_key == "#text":
                text = None if child is None else _xml_text(child)
            elif isinstance(child_key, str) and child_key.startswith("@"):
                if isinstance(child, dict):
                    raise _UnusualXml
                attribute = _xml_name(child_key[1:], "attribute")
                parts.append(" %s=%s" % (attribute, quoteattr("" if child is None else _xml_text(child))))
            elif not (isinstance(child, list) and not child):
                children.append((child_key, child))
        if not children and not text:
            parts.append("/>")
            continue
        parts.append(">")
        for child_key, child in children:
            _join_element(child_key, child, parts)
        if text:
            parts.append(escape(text))
        parts.append("</" + name + ">")


def _all_instances(backend: EC2Backend, filters: Any = None) -> list[Instance]:
    return [
        instance
        for reservation in list(backend.reservations.values())
        for instance in reservation.instances
        if instance.applies(filters)
    ]


def _multi_instances_by_id(backend: EC2Backend, instance_ids: list[str], filters: Any = None) -> list[Instance]:
    by_id = {i.id: i for reservation in list(backend.reservations.values()) for i in reservation.instances}
    missing = [instance_id for instance_id in instance_ids if instance_id not in by_id]
    if missing:
        raise InvalidInstanceIdError(missing)
    return [by_id[i] for i in instance_ids if by_id[i].applies(filters)]


def _instance_by_id(backend: EC2Backend, instance_id: str) -> Instance:
    # Newest first: the instance not yet in a timeline is the one being launched (moto's
    # run_instances looks it up to attach its volumes), and it is in the last reservation.
    for reservation in reversed(backend.reservations.values()):
        for instance in reservation.instances:
            if instance.id == instance_id:
                return instance
    raise InvalidInstanceIdError(instance_id)


def _tags_of_resource(resource: TaggedEC2Resource) -> list[dict[str, str]]:
    """What moto's get_tags answers (its describe_tags with a resource-id filter), in the same
    order, without the scan. Resource ids hold no wildcards, so the filter is an exact match."""
    resource_id = getattr(resource, "id", None)
    if not resource_id:
        return []
    tags = resource.ec2_backend.tags.get(resource_id, {})  # type: ignore[attr-defined]
    resource_type = moto_ec2_utils.EC2_PREFIX_TO_RESOURCE.get(moto_ec2_utils.get_prefix(resource_id), "")
    return [
        {"resource_id": resource_id, "key": key, "value": value, "resource_type": resource_type}
        for key, value in tags.items()
    ]


# --------------------------------------------------------------------------
# HTTP: the EC2 middleware and the control API
# --------------------------------------------------------------------------


def drop_connection(environ: dict[str, Any]) -> None:
    """Closes the client's socket with no response at all; the client sees EOF."""
    environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
    # werkzeug's request handler treats ConnectionError as a vanished client and writes nothing.
    raise ConnectionAbortedError("acode lab: drop_connection fault")


class Ec2Middleware:
    """Sits in front of moto: control API, counters, faults, and the actions the lab answers itself."""

    def __init__(self, lab: Lab, moto_app: Callable, control: Callable):
        self.lab = lab
        self.moto_app = moto_app
        self.control = control
        self.own_actions = {
            "GetConsoleOutput": self._console_output,
            "GetSpotPlacementScores": self.lab.placement_scores,
            "DescribeSpotPriceHistory": self.lab.spot_price_history,
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        if environ.get("PATH_INFO", "").startswith("/_lab/"):
            return self.control(environ, start_response)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith(PRICING_TARGET_PREFIX):
            # moto has no Price List API. Other awsJson targets (e.g. Service Quotas) go to moto as before.
            return self._pricing(target[len(PRICING_TARGET_PREFIX) :], environ)(environ, start_response)
        form = self._read_form(environ)
        action = form.get("Action")
        if not action:
            return self.moto_app(environ, start_response)
        self.lab.count(action)
        if not self.lab.admit(action):
            # As EC2: the throttled call does nothing, and a fault rule waits for a call that gets through.
            return ec2_error_response("RequestLimitExceeded")(environ, start_response)
        rule = self.lab.take_fault(action, form)
        answer = lambda: self._answer(action, form, environ)  # noqa: E731
        response = self._faulted(rule, answer, environ) if rule else answer()
        return response(environ, start_response)

    def _pricing(self, operation: str, environ: dict[str, Any]) -> Response:
        """The Price List API (awsJson1_1): counted and faulted like EC2 actions, by operation name.
        Not throttled: `throttle` models EC2's own request buckets."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        self.lab.count(operation)
        rule = self.lab.take_fault(operation, {})

        def answer() -> Response:
            if operation != "GetProducts":
                return json_error_response("UnknownOperationException", f"The acode lab does not answer {operation}")
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                return json_error_response("SerializationException", "The request body is not JSON")
            return self.lab.get_products(body)

        return self._faulted(rule, answer, environ, json_protocol=True) if rule else answer()

    @staticmethod
    def _read_form(environ: dict[str, Any]) -> dict[str, str]:
        """Parses the query-protocol form and puts the body back for moto."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        text = body.decode("utf-8", "replace") or environ.get("QUERY_STRING", "")
        return dict(parse_qsl(text, keep_blank_values=True))

    @staticmethod
    def _faulted(
        rule: FaultRule, answer: Callable[[], Response], environ: dict[str, Any], json_protocol: bool = False
    ) -> Response:
        early = answer() if rule.when == "after" else None
        time.sleep(rule.latency_ms / 1000.0)
        if rule.drop_connection:
            drop_connection(environ)
        error = rule.error_response(json_protocol)
        if error is not None:
            return error
        return early if early is not None else answer()

    def _answer(self, action: str, form: dict[str, str], environ: dict[str, Any]) -> Response:
        self.lab.advance()
        own = self.own_actions.get(action)
        if own is not None:
            response = own(form)
            if response is not None:
                return response
        if action == "RunInstances":
            with launch_request(form):
                return self._call_moto(environ)
        return self._call_moto(environ)

    def _call_moto(self, environ: dict[str, Any]) -> Response:
        # One moto call at a time: moto's models are not thread-safe (under a few hundred concurrent
        # sessions, CreateKeyPair beside DescribeKeyPairs raised "dictionary changed size during
        # iteration" as a 500). Each call takes milliseconds; latency faults sleep outside the lock.
        with self.lab.lock:
            app_iter, status, headers = run_wsgi_app(self.moto_app, environ, buffered=True)
            try:
                body = b"".join(app_iter)
            finally:
                if hasattr(app_iter, "close"):
                    app_iter.close()
        return Response(body, status=status, headers=headers)

    def _console_output(self, form: dict[str, str]) -> Response | None:
        instance_id = form.get("InstanceId", "")
        known, output = self.lab.console_output(instance_id)
        if not known:
            return None  # moto answers InvalidInstanceID.NotFound
        now = utc_iso(datetime.datetime.now(datetime.timezone.utc))
        inner = f"<instanceId>{escape(instance_id)}</instanceId><timestamp>{now}</timestamp>"
        if output is not None:
            text = base64.b64encode(output).decode()
            if self.lab.config["console_mode"] == "not-base64":
                text = "%% garbled in transit %%"
            inner += f"<output>{text}</output>"
        return ec2_result_response("GetConsoleOutput", inner)


class ControlApi:
    """JSON over HTTP under /_lab/ (see README.md)."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.routes: dict[tuple[str, str], Callable[[Request], Any]] = {
            ("GET", "/_lab/health"): lambda req: {"ok": True},
            ("GET", "/_lab/config"): lambda req: lab.config_snapshot(),
            ("POST", "/_lab/config"): lambda req: lab.update_config(self._json(req)),
            ("GET", "/_lab/faults"): self._list_faults,
            ("POST", "/_lab/faults"): self._add_fault,
            ("DELETE", "/_lab/faults"): self._clear_faults,
            ("GET", "/_lab/counters"): self._counters,
            ("POST", "/_lab/counters/reset"): self._reset_counters,
            ("GET", "/_lab/throttle"): lambda req: lab.throttle_view(),
            ("POST", "/_lab/spot/interrupt"): self._interrupt,
            ("POST", "/_lab/interrupt"): self._interrupt,
            ("GET", "/_lab/ssh"): lambda req: lab.ssh_view(),
            ("POST", "/_lab/ssh"): self._ssh,
            ("GET", "/_lab/instances"): lambda req: lab.instances_view(),
            ("GET", "/_lab/key_pairs"): lambda req: lab.key_pairs_view(),
            ("GET", "/_lab/authorized_keys"): self._authorized_keys,
            ("POST", "/_lab/instance_profiles"): self._instance_profile,
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        request = Request(environ)
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            status, payload = 404, {"error": f"no control endpoint {request.method} {request.path}"}
        else:
            try:
                status, payload = 200, handler(request)
            except BadRequest as error:
                status, payload = 400, {"error": str(error)}
        return Response(json.dumps(payload), status=status, mimetype="application/json")(environ, start_response)

    @staticmethod
    def _json(request: Request, default: Any = None) -> Any:
        raw = request.get_data(as_text=True)
        if not raw.strip():
            if default is None:
                raise BadRequest("expected a JSON body")
            return default
        try:
            return json.loads(raw)
        except ValueError as error:
            raise BadRequest(f"bad JSON: {error}") from None

    def _list_faults(self, request: Request) -> list[dict[str, Any]]:
        with self.lab.lock:
            return [rule.to_json() for rule in self.lab.faults]

    def _add_fault(self, request: Request) -> dict[str, Any]:
        rule = FaultRule.parse(self._json(request))
        self.lab.add_fault(rule)
        return rule.to_json()

    def _clear_faults(self, request: Request) -> dict[str, Any]:
        with self.lab.lock:
            self.lab.faults.clear()
        return {"ok": True}

    def _counters(self, request: Request) -> dict[str, int]:
        with self.lab.lock:
            return dict(self.lab.counters)

    def _reset_counters(self, request: Request) -> dict[str, Any]:
        with self.lab.lock:
            self.lab.counters.clear()
            self.lab.throttled.clear()
        return {"ok": True}

    def _interrupt(self, request: Request) -> dict[str, Any]:
        body = self._json(request, default={})
        if not isinstance(body, dict):
            raise BadRequest("spot/interrupt: expected a JSON object")
        unknown = sorted(set(body) - {"instance_id", "notice_s", "action"})
        if unknown:
            raise BadRequest(f"spot/interrupt: unknown key '{unknown[0]}'")
        instance_id = body.get("instance_id")
        if instance_id is not None and not isinstance(instance_id, str):
            raise BadRequest("spot/interrupt key 'instance_id': expected a string")
        action = body.get("action", "terminate")
        if action not in INTERRUPTION_ACTIONS:
            raise BadRequest(f"spot/interrupt key 'action': expected one of {list(INTERRUPTION_ACTIONS)}")
        notice_s = body.get("notice_s", 120)
        if isinstance(notice_s, bool) or not isinstance(notice_s, (int, float)) or notice_s < 0:
            raise BadRequest("spot/interrupt key 'notice_s': expected a number >= 0")
        return self.lab.interrupt(instance_id, action, float(notice_s))

    def _ssh(self, request: Request) -> dict[str, Any]:
        body = self._json(request)
        if not isinstance(body, dict) or "mode" not in body:
            raise BadRequest("ssh: expected {\"mode\": ...}")
        unknown = sorted(set(body) - {"mode", "drop_sessions"})
        if unknown:
            raise BadRequest(f"ssh: unknown key '{unknown[0]}'")
        mode = body["mode"]
        if mode not in SSH_MODES:
            raise BadRequest(f"ssh key 'mode': expected one of {list(SSH_MODES)}")
        drop_sessions = body.get("drop_sessions", False)
        if not isinstance(drop_sessions, bool):
            raise BadRequest("ssh key 'drop_sessions': expected true or false")
        return self.lab.set_ssh_mode(mode, drop_sessions)

    def _authorized_keys(self, request: Request) -> list[str]:
        with self.lab.lock:
            return list(self.lab.authorized_keys.values())

    def _instance_profile(self, request: Request) -> dict[str, str]:
        """An IAM instance profile in moto's IAM, which RunInstances checks a profile ARN against."""
        body = self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise BadRequest('instance_profiles: expected {"name": "..."}')
        unknown = sorted(set(body) - {"name"})
        if unknown:
            raise BadRequest(f"instance_profiles: unknown key '{unknown[0]}'")
        iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
        with self.lab.lock:
            existing = iam.instance_profiles.get(body["name"])
            profile = existing or iam.create_instance_profile(name=body["name"], path="/", role_names=[])
        return {"arn": profile.arn}


# --------------------------------------------------------------------------
# IMDSv2-style endpoint
# --------------------------------------------------------------------------


class ImdsHandler(BaseHTTPRequestHandler):
    server_version = "EC2ws"
    lab: Lab  # set on the subclass made by start_imds

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token":
            return self._send(404, "")
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400, "")
        token = self.lab.imds_issue_token(int(ttl))
        self._send(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self) -> None:
        if not self.lab.imds_token_valid(self.headers.get("X-aws-ec2-metadata-token")):
            return self._send(401, "")
        # One IMDS stands in for every instance's; the engine names the asking instance (real IMDS
        # ignores the header).
        self._send(*self.lab.imds_get(self.path, self.headers.get(IMDS_INSTANCE_HEADER) or None))

    def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("imds: " + format, *args)


def start_imds(lab: Lab) -> ThreadingHTTPServer:
    handler = type("LabImdsHandler", (ImdsHandler,), {"lab": lab})
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="imds", daemon=True).start()
    return server


# --------------------------------------------------------------------------
# sshd and the gate in front of it
# --------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved before any fork
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: sshd gets SIGTERM when the lab dies, even by SIGKILL.

    The kernel ties this to the thread that forked, so sshd is started from the main thread.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def read_ssh_banner(port: int, timeout_s: float) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as conn:
        return conn.recv(64)


class Sshd:
    """A real OpenSSH sshd on a private loopback port, owned by the lab."""

    def __init__(self, state_dir: Path, authorized_keys_path: Path):
        self.state_dir = state_dir
        self.authorized_keys_path = authorized_keys_path
        self.config_path = state_dir / "sshd_config"
        self.log_path = state_dir / "sshd.log"
        self.pid_path = state_dir / "sshd.pid"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation dir
        if not privsep.exists():
            privsep.mkdir(mode=0o755, parents=True)
        self.port = free_port()
        self._write_config()
        check = subprocess.run(
            ["/usr/sbin/sshd", "-t", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t failed: {check.stderr.strip()}")
        # -r: sshd does not re-execute itself per connection, which cuts its CPU per key exchange
        # from about 13 ms to 3 ms (a fleet recover logs in hundreds of times); clients see the
        # same server. An OpenSSH that no longer takes the flag runs without it.
        no_rexec = subprocess.run(
            ["/usr/sbin/sshd", "-t", "-r", "-f", str(self.config_path)], capture_output=True
        )
        flags = ["-r"] if no_rexec.returncode == 0 else []
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", *flags, "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own process group, so stop() also reaches session children
                preexec_fn=_die_with_parent,
            )
        self._wait_listening()
        log.info("sshd pid %s on port %s", self.proc.pid, self.port)

    def _write_config(self) -> None:
        d = self.state_dir
        self.config_path.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {LOOPBACK}\n"
            f"HostKey {d / 'ssh_host_ed25519_key'}\n"
            f"HostKey {d / 'ssh_host_rsa_key'}\n"
            f"PidFile {self.pid_path}\n"
            f"AuthorizedKeysFile {self.authorized_keys_path}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "LogLevel INFO\n"
            # Tests probe many sessions at once; the default (10:30:100) drops some.
            "MaxStartups 200\n"
        )

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError):
                if read_ssh_banner(self.port, 1.0).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on port {self.port}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def reset_connection(conn: socket.socket) -> None:
    """Closes with RST instead of FIN: the client reads "connection reset by peer"."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class SessionSet:
    """The connections the gate is splicing, so POST /_lab/ssh can cut them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pairs: set[tuple[socket.socket, socket.socket]] = set()

    def add(self, client: socket.socket, upstream: socket.socket) -> None:
        with self.lock:
            self.pairs.add((client, upstream))

    def remove(self, client: socket.socket, upstream: socket.socket) -> None:
        with self.lock:
            self.pairs.discard((client, upstream))

    def drop_all(self) -> int:
        """Shuts both ends down: the pumps wake and the client reads EOF, as when sshd goes away.
        (shutdown, not close: the pump threads are blocked in recv on these sockets.)"""
        with self.lock:
            pairs = list(self.pairs)
        for client, upstream in pairs:
            for conn in (client, upstream):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        return len(pairs)


def splice(client: socket.socket, target_port: int, sessions: SessionSet) -> None:
    try:
        upstream = socket.create_connection((LOOPBACK, target_port), timeout=5)
    except OSError:
        reset_connection(client)
        return
    upstream.settimeout(None)
    sessions.add(client, upstream)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    sessions.remove(client, upstream)
    client.close()
    upstream.close()


def reset_mid_handshake(client: socket.socket, target_port: int) -> None:
    """Passes sshd's version line and the client's first bytes (its version and key exchange
    offer), then resets: the client fails during the handshake, not before it."""
    try:
        with socket.create_connection((LOOPBACK, target_port), timeout=5) as upstream:
            client.settimeout(5)
            client.sendall(upstream.recv(256))  # sshd's banner
            client.recv(4096)  # the client's banner, maybe its KEXINIT too
    except OSError:
        pass
    reset_connection(client)


def stay_silent(client: socket.socket, lab: Lab) -> None:
    """Accepts and says nothing until the client gives up or the mode changes."""
    client.settimeout(0.1)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and lab.ssh_gate_mode() == "silent":
            try:
                if not client.recv(4096):
                    break  # the client closed
            except TimeoutError:
                continue
    except OSError:
        pass
    client.close()


class SshGate(threading.Thread):
    """The public SSH port. Splices to sshd, or stops listening ("closed"), resets connections
    ("reset", "reset-mid-handshake") or holds them silent ("silent") while the lab's ssh_start_delay_s / ssh_refuse_s windows last,
    or as POST /_lab/ssh says."""

    def __init__(self, lab: Lab, target_port: int):
        super().__init__(name="ssh-gate", daemon=True)
        self.lab = lab
        self.target_port = target_port
        self.stopping = threading.Event()
        # Guards `listener` between this thread and on_mode_change; never held while calling the lab.
        self.listener_lock = threading.Lock()
        self.listener: socket.socket | None = self._listen(0)
        self.listener_shut = False  # shut down by on_mode_change; this thread closes it
        self.port = self.listener.getsockname()[1]
        self.sessions = SessionSet()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebinding after "closed"
        listener.bind((LOOPBACK, port))
        listener.listen(128)
        return listener

    def on_mode_change(self) -> None:
        """Called inside RunInstances and by POST /_lab/ssh: stop listening before the call
        returns, so no probe slips in between. On Linux, shutdown() of a listening socket refuses
        new connections at once and wakes select(); the gate thread then closes it."""
        if self.lab.ssh_gate_mode() != "closed":
            return
        with self.listener_lock:
            if self.listener is not None and not self.listener_shut:
                self.listener.shutdown(socket.SHUT_RDWR)
                self.listener_shut = True

    def settle(self, timeout_s: float = 2.0) -> None:
        """Waits until this thread has applied the current mode, so POST /_lab/ssh answers only
        once connections meet the new mode. Never call it holding the lab's gate_lock: this thread needs it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            closed = self.lab.ssh_gate_mode() == "closed"
            with self.listener_lock:
                if (self.listener is None) == closed and not self.listener_shut:
                    return
            time.sleep(0.01)

    def run(self) -> None:
        while not self.stopping.is_set():
            listener = self._listener_for(self.lab.ssh_gate_mode())
            if listener is None:
                time.sleep(0.02)
                continue
            ready, _, _ = select.select([listener], [], [], 0.05)
            if not ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue  # shut down by on_mode_change; replaced on the next turn unless still closed
            self._handle(conn)
        self._listener_for("closed")

    def _listener_for(self, mode: str) -> socket.socket | None:
        with self.listener_lock:
            # A shut-down listener is dead even if the mode opened again before this thread saw "closed".
            if self.listener is not None and (mode == "closed" or self.listener_shut):
                self.listener.close()
                self.listener = None
                self.listener_shut = False
            if mode != "closed" and self.listener is None:
                self.listener = self._listen(self.port)
            return self.listener

    def _handle(self, conn: socket.socket) -> None:
        mode = self.lab.ssh_gate_mode()
        if mode == "open":
            threading.Thread(target=splice, args=(conn, self.target_port, self.sessions), daemon=True).start()
        elif mode == "reset-mid-handshake":
            threading.Thread(target=reset_mid_handshake, args=(conn, self.target_port), daemon=True).start()
        elif mode == "silent":
            threading.Thread(target=stay_silent, args=(conn, self.lab), daemon=True).start()
        else:
            reset_connection(conn)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=2)


# --------------------------------------------------------------------------
# Startup and shutdown
# --------------------------------------------------------------------------


def claim_stdout() -> io.TextIOWrapper:
    """Keeps the real stdout for the ready line alone; fd 1 and sys.stdout then point at
    stderr, so moto's stray prints and child processes never write to stdout."""
    ready_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return ready_out


def setup_logging(state_dir: Path) -> None:
    file_handler = logging.FileHandler(state_dir / "lab.log")
    file_handler.setLevel(logging.INFO)
    stderr_handler = logging.StreamHandler(sys.stderr)
    # Warnings only: a parent that pipes stderr without reading it must not block the lab.
    stderr_handler.setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=[file_handler, stderr_handler],
    )
    # werkzeug's line per request took about 7% of the lab's Python time under a fleet; the lab logs what
    # it decides, and the engine logs every call it makes.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="acode EC2 lab (moto + sshd + IMDS on loopback)")
    parser.add_argument("--state-dir", required=True, type=Path)
    for key in CLI_CONFIG_KEYS:
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=float, default=DEFAULT_CONFIG[key])
    return parser.parse_args(argv)


def start_ec2_server(lab: Lab) -> Any:
    moto_app = DomainDispatcherApplication(create_backend_app)
    app = Ec2Middleware(lab, moto_app, ControlApi(lab))
    server = make_server(LOOPBACK, 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, name="ec2", daemon=True).start()
    return server


def wait_until_answering(ec2_port: int, imds_port: int, ssh_port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://{LOOPBACK}:{ec2_port}/_lab/health", timeout=2).read()
            token_request = urllib.request.Request(
                f"http://{LOOPBACK}:{imds_port}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            )
            urllib.request.urlopen(token_request, timeout=2).read()
            if read_ssh_banner(ssh_port, 2).startswith(b"SSH-"):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def lab_ami_id(backend: EC2Backend) -> str:
    images = backend.describe_images(filters={"name": [LAB_AMI_NAME]})
    if not images:
        raise RuntimeError(f"moto has no AMI named {LAB_AMI_NAME}")
    return images[0].id


def ready_line(lab: Lab, ec2_port: int, imds_port: int, ssh_port: int, ssh_user: str) -> dict[str, Any]:
    backend = lab.backend
    subnets = {az: subnet.id for az, subnet in sorted(backend.get_default_subnets().items())}
    return {
        "ec2_endpoint": f"http://{LOOPBACK}:{ec2_port}",
        "control_url": f"http://{LOOPBACK}:{ec2_port}/_lab",
        "sshd_port": ssh_port,
        "ssh_user": ssh_user,
        "imds_endpoint": f"http://{LOOPBACK}:{imds_port}",
        "region": REGION,
        "subnets": subnets,
        "security_group_id": backend.get_security_group_by_name_or_id("default").id,
        "ami_id": lab_ami_id(backend),
        "host_key_fingerprints": [key.fingerprint for key in lab.host_keys],
    }


def keys_dir(state_dir: Path) -> Path:
    """Where sshd's authorized_keys lives: a private folder on /dev/shm (tmpfs), else the state dir.
    The lab rewrites the file whole, a new file renamed over the old, at every launch and
    termination, under the lock every moto call waits on. On ext4 each new file's inode search
    skips past the inodes freed in the last seconds: 2 ms a launch under a fleet. On tmpfs it
    takes microseconds, and the file needs no disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return state_dir
    # A lab killed by SIGKILL leaves its folder: the next lab removes those no live lab holds.
    for stale in shm.glob(KEYS_DIR_PREFIX + "*"):
        if not keys_dir_held(stale):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        path = Path(tempfile.mkdtemp(prefix=KEYS_DIR_PREFIX, dir=shm))  # mode 0700
        # Held (never closed) while this lab lives; the kernel lets go when the process ends.
        holder = os.open(path / KEYS_DIR_HOLD, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:  # /dev/shm full, or no flock there
        log.warning("keeping authorized_keys in the state dir: %s", error)
        return state_dir
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


KEYS_DIR_PREFIX = "acode-lab-keys-"
KEYS_DIR_HOLD = "held-by-a-live-lab"


def keys_dir_held(path: Path) -> bool:
    """Whether a live lab holds the folder: another lab, maybe in another pid namespace, is
    seen by its lock, not by its pid. A folder without its lock file yet is being made: held."""
    try:
        probe = os.open(path / KEYS_DIR_HOLD, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return time.time() - path.stat().st_mtime < 60
        except OSError:
            return False  # gone already
    except OSError:
        return True
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(probe)
    return False


def watch_stdin(shutdown: threading.Event) -> None:
    """The parent holds our stdin; EOF means it is gone."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    log.info("stdin closed")
    shutdown.set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ready_out = claim_stdout()
    state_dir = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(state_dir)

    shutdown = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: shutdown.set())

    # moto's imports and models for the warm-up take about 1.4 s of Python; ssh-keygen and sshd's
    # start (other processes) overlap them. Nothing else touches moto until the join.
    warming = threading.Thread(target=warm_moto_backends, name="warm-moto", daemon=True)
    warming.start()
    host_keys = generate_key_pair(state_dir / "ssh_host")
    # The keys a man in the middle would show: fresh for every lab run.
    for stale in state_dir.glob("mitm_*"):
        stale.unlink()
    mitm_keys = generate_key_pair(state_dir / "mitm")

    authorized_keys_path = keys_dir(state_dir) / "authorized_keys"
    sshd = Sshd(state_dir, authorized_keys_path)
    atexit.register(sshd.stop)
    sshd.start()  # from the main thread: see _die_with_parent

    config = json.loads(json.dumps(DEFAULT_CONFIG))
    config.update({key: getattr(args, key) for key in CLI_CONFIG_KEYS})
    warming.join()
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    lab = Lab(backend, config, host_keys, mitm_keys, authorized_keys_path)
    install_moto_patches(lab)

    gate = SshGate(lab, sshd.port)
    lab.on_gate_change = gate.on_mode_change
    lab.settle_gate = gate.settle
    lab.drop_ssh_sessions = gate.sessions.drop_all
    gate.start()
    imds = start_imds(lab)
    ec2 = start_ec2_server(lab)
    imds_port = imds.server_address[1]
    wait_until_answering(ec2.port, imds_port, gate.port)

    ssh_user = pwd.getpwuid(os.geteuid()).pw_name  # sshd only lets in the user it runs as
    ready_out.write(json.dumps(ready_line(lab, ec2.port, imds_port, gate.port, ssh_user), separators=(",", ":")) + "\n")
    ready_out.flush()
    log.info("ready")
    threading.Thread(target=watch_stdin, args=(shutdown,), name="stdin", daemon=True).start()

    while not shutdown.wait(0.5):
        pass
    log.info("shutting down")
    ec2.shutdown()
    imds.shutdown()
    gate.stop()
    sshd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
