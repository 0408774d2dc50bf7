#!/usr/bin/env python3
"""Self-check of the acode EC2 lab: python tests/lab/test_lab.py (with the lab venv's python).

Starts acode_lab.py as a subprocess, drives it with boto3 and ssh, and checks
every behaviour the lab adds to moto. Runs in well under a minute.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError, ConnectionClosedError  # noqa: E402
from botocore.handlers import decode_console_output  # noqa: E402

LAB = Path(__file__).with_name("acode_lab.py")
DEFAULT_SPOT_PRICES = {
    "us-east-1a": 0.0035,
    "us-east-1b": 0.0031,
    "us-east-1c": 0.0040,
    "us-east-1d": 0.0042,
    "us-east-1e": 0.0045,
    "us-east-1f": 0.0050,
}
DEFAULT_ON_DEMAND_PRICES = {"t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "m5.large": 0.096}
SPOT_MARKET = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time"}}
# The TERM_MATCH filters an EC2 client sends to the Price List API for one type's Linux on-demand price.
EC2_PRICE_FILTERS = {
    "regionCode": "us-east-1",
    "operatingSystem": "Linux",
    "tenancy": "Shared",
    "preInstalledSw": "NA",
    "capacitystatus": "Used",
}
# Lab windows are this long; checks of the state inside a window happen right away.
WINDOW_S = 0.5


def start_lab(state_dir: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    with open(state_dir.parent / f"{state_dir.name}.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(LAB), "--state-dir", str(state_dir), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready:
        proc.kill()
        raise RuntimeError("lab did not print its ready line")
    return proc, json.loads(proc.stdout.readline())


SHM_WRITABLE = Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout_s: float = 5.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


class LabTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory(prefix="acode-lab-test-")
        cls.tmp_path = Path(cls.tmp.name)
        cls.state_dir = cls.tmp_path / "state"
        cls.proc, cls.ready = start_lab(cls.state_dir)
        cls.ec2 = cls.client(max_attempts=1)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.proc.poll() is None:
            cls.proc.kill()
            cls.proc.wait()
        cls.proc.stdin.close()
        cls.proc.stdout.close()
        cls.tmp.cleanup()

    @classmethod
    def client(cls, max_attempts: int):
        ec2 = boto3.client(
            "ec2",
            endpoint_url=cls.ready["ec2_endpoint"],
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": max_attempts, "mode": "standard"}),
        )
        # botocore base64-decodes console output lossily; the tests want the raw bytes.
        ec2.meta.events.unregister("after-call.ec2.GetConsoleOutput", decode_console_output)
        return ec2

    def setUp(self) -> None:
        self.control("DELETE", "/faults")
        self.control(
            "POST",
            "/config",
            {
                "boot_delay_s": 0,
                "status_ok_delay_s": 0,
                "terminate_delay_s": 0,
                "console_lag_s": 0,
                "console_mode": "ok",
                "status_mode": "ok",
                "address_mode": "public",
                "ssh_start_delay_s": 0,
                "ssh_refuse_s": 0,
                "spot_mode": "fulfilled",
                "spot_fulfill_delay_s": 0,
                "placement_scores": {"us-east-1a": 9, "us-east-1b": 3},
                "visibility_delay_s": 0,
                "spot_prices": DEFAULT_SPOT_PRICES,
                "on_demand_prices": DEFAULT_ON_DEMAND_PRICES,
                "spot_cancel_race": False,
                "spot_reclaim_after_running_s": None,
                "spot_reclaim_notice_s": 120,
                "throttle": None,
            },
        )
        self.control("POST", "/ssh", {"mode": "auto"})

    # -- helpers ---------------------------------------------------------------

    def control(self, method: str, path: str, body=None, expect: int = 200):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(self.ready["control_url"] + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, payload = response.status, json.load(response)
        except urllib.error.HTTPError as error:
            status, payload = error.code, json.load(error)
        self.assertEqual(status, expect, payload)
        return payload

    def run_instance(self, **params):
        args = {
            "ImageId": self.ready["ami_id"],
            "MinCount": 1,
            "MaxCount": 1,
            "InstanceType": "t3.micro",
            "SubnetId": self.ready["subnets"]["us-east-1a"],
        }
        args.update(params)
        return self.ec2.run_instances(**args)

    def describe(self, instance_id: str) -> dict:
        return self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def state(self, instance_id: str) -> tuple[str, int]:
        state = self.describe(instance_id)["State"]
        return state["Name"], state["Code"]

    def wait_state(self, instance_id: str, name: str) -> None:
        self.assertTrue(wait_for(lambda: self.state(instance_id)[0] == name), f"{instance_id} never {name}")

    def assert_error(self, call, code: str, status: int) -> None:
        with self.assertRaises(ClientError) as caught:
            call()
        self.assertEqual(caught.exception.response["Error"]["Code"], code)
        self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"], status)

    def console_text(self, instance_id: str) -> bytes | None:
        output = self.ec2.get_console_output(InstanceId=instance_id).get("Output")
        return None if output is None else base64.b64decode(output)

    def spot_request(self, request_id: str) -> dict:
        return self.ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])["SpotInstanceRequests"][0]

    def spot_launch(self, **params) -> dict:
        return self.run_instance(InstanceMarketOptions=SPOT_MARKET, **params)["Instances"][0]

    def request_summary(self, request_id: str) -> tuple[str, str, str | None]:
        """(state, status code, instance id) of a spot request."""
        request = self.spot_request(request_id)
        return request["State"], request["Status"]["Code"], request.get("InstanceId")

    def imds_token(self) -> str:
        status, token = self.imds("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        self.assertEqual(status, 200)
        return token

    def instance_action(self, token: str, instance_id: str | None) -> tuple[int, dict | None]:
        headers = {"X-aws-ec2-metadata-token": token}
        if instance_id:
            headers["X-Acode-Instance-Id"] = instance_id
        status, body = self.imds("GET", "/latest/meta-data/spot/instance-action", headers)
        return status, json.loads(body) if status == 200 else None

    def imds(self, method: str, path: str, headers: dict) -> tuple[int, str]:
        request = urllib.request.Request(self.ready["imds_endpoint"] + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    def ssh_banner(self, host: str = "127.0.0.1") -> bytes:
        with socket.create_connection((host, self.ready["sshd_port"]), timeout=3) as conn:
            return conn.recv(64)

    def instance_statuses(self, instance_ids: list[str]) -> dict[str, dict]:
        answer = self.ec2.describe_instance_status(InstanceIds=instance_ids, IncludeAllInstances=True)
        return {s["InstanceId"]: s for s in answer["InstanceStatuses"]}

    # -- ready line --------------------------------------------------------------

    def test_ready_line(self) -> None:
        ready = self.ready
        for key in ("ec2_endpoint", "control_url", "imds_endpoint"):
            self.assertTrue(ready[key].startswith("http://127.0.0.1:"), key)
        self.assertEqual(ready["region"], "us-east-1")
        self.assertEqual(ready["ssh_user"], "root")
        self.assertGreaterEqual(len(ready["subnets"]), 2)
        subnets = self.ec2.describe_subnets(SubnetIds=list(ready["subnets"].values()))["Subnets"]
        self.assertEqual({s["AvailabilityZone"]: s["SubnetId"] for s in subnets}, ready["subnets"])
        self.assertEqual(len(self.ec2.describe_images(ImageIds=[ready["ami_id"]])["Images"]), 1)
        self.ec2.describe_security_groups(GroupIds=[ready["security_group_id"]])
        expected = [
            subprocess.run(["ssh-keygen", "-lf", str(p)], capture_output=True, text=True, check=True).stdout.split()[1]
            for p in sorted(self.state_dir.glob("ssh_host_*_key.pub"))
        ]
        self.assertEqual(sorted(ready["host_key_fingerprints"]), sorted(expected))
        self.assertEqual(self.control("GET", "/health"), {"ok": True})

    # -- boot and terminate timing ----------------------------------------------------

    def test_boot_status_and_terminate_timing(self) -> None:
        delays = {"boot_delay_s": WINDOW_S, "status_ok_delay_s": WINDOW_S, "terminate_delay_s": WINDOW_S}
        self.control("POST", "/config", delays)
        session = "timing-1"
        instance = self.run_instance(
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "acode-session-id", "Value": session}]}]
        )["Instances"][0]
        instance_id = instance["InstanceId"]
        self.assertEqual(instance["State"], {"Code": 0, "Name": "pending"})
        pending = self.ec2.describe_instances(
            Filters=[
                {"Name": "instance-state-name", "Values": ["pending"]},
                {"Name": "tag:acode-session-id", "Values": [session]},
            ]
        )["Reservations"]
        self.assertEqual([i["InstanceId"] for r in pending for i in r["Instances"]], [instance_id])
        # Only running instances have status checks unless IncludeAllInstances is set.
        self.assertEqual(self.ec2.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"], [])

        self.wait_state(instance_id, "running")
        self.assertEqual(self.state(instance_id), ("running", 16))
        status = self.ec2.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"][0]
        self.assertEqual(status["InstanceStatus"]["Status"], "initializing")
        self.assertEqual(status["SystemStatus"]["Status"], "initializing")

        def checks_ok():
            statuses = self.ec2.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"]
            return statuses[0]["InstanceStatus"]["Status"] == "ok" and statuses[0]["SystemStatus"]["Status"] == "ok"

        self.assertTrue(wait_for(checks_ok))

        terminating = self.ec2.terminate_instances(InstanceIds=[instance_id])["TerminatingInstances"][0]
        self.assertEqual(terminating["CurrentState"]["Name"], "shutting-down")
        self.assertEqual(self.state(instance_id), ("shutting-down", 32))
        self.wait_state(instance_id, "terminated")
        self.assertEqual(self.state(instance_id), ("terminated", 48))
        by_state = self.ec2.describe_instances(
            Filters=[
                {"Name": "instance-state-name", "Values": ["terminated"]},
                {"Name": "tag:acode-session-id", "Values": [session]},
            ]
        )["Reservations"]
        self.assertEqual(len(by_state), 1)

    def test_visibility_delay(self) -> None:
        self.control("POST", "/config", {"visibility_delay_s": WINDOW_S})
        session = "visibility-1"
        instance_id = self.run_instance(
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "acode-session-id", "Value": session}]}]
        )["Instances"][0]["InstanceId"]
        by_tag = [{"Name": "tag:acode-session-id", "Values": [session]}]
        # Not visible yet: absent from filtered lists, NotFound by id, to Describe and Terminate alike.
        self.assertEqual(self.ec2.describe_instances(Filters=by_tag)["Reservations"], [])
        self.assert_error(lambda: self.ec2.describe_instances(InstanceIds=[instance_id]), "InvalidInstanceID.NotFound", 400)
        self.assert_error(
            lambda: self.ec2.terminate_instances(InstanceIds=[instance_id]), "InvalidInstanceID.NotFound", 400
        )

        def listed() -> bool:
            reservations = self.ec2.describe_instances(Filters=by_tag)["Reservations"]
            return [i["InstanceId"] for r in reservations for i in r["Instances"]] == [instance_id]

        self.assertTrue(wait_for(listed))
        self.ec2.terminate_instances(InstanceIds=[instance_id])

    def test_status_modes(self) -> None:
        # Each mode is snapshotted at launch: the config changes between launches,
        # and every instance keeps the mode it was launched with.
        modes = {"ok": ("ok", "passed"), "impaired": ("impaired", "failed")}
        modes["insufficient-data"] = ("insufficient-data", "insufficient-data")
        launched = {}
        for mode in modes:
            self.control("POST", "/config", {"status_ok_delay_s": 2 * WINDOW_S, "status_mode": mode})
            launched[self.run_instance()["Instances"][0]["InstanceId"]] = mode
        launched_at = datetime.datetime.now(datetime.timezone.utc)
        self.control("POST", "/config", {"status_mode": "ok"})

        before = self.instance_statuses(list(launched))
        self.assertEqual(set(before), set(launched))
        for instance_id, status in before.items():
            with self.subTest(status_mode=launched[instance_id], phase="before"):
                self.assertEqual(status["InstanceState"]["Name"], "running")
                for check in ("InstanceStatus", "SystemStatus"):
                    self.assertEqual(status[check]["Status"], "initializing")
                    self.assertEqual(status[check]["Details"], [{"Name": "reachability", "Status": "initializing"}])

        def settled() -> dict[str, dict] | None:
            statuses = self.instance_statuses(list(launched))
            return None if any(s["InstanceStatus"]["Status"] == "initializing" for s in statuses.values()) else statuses

        statuses = wait_for(settled)
        self.assertTrue(statuses, "status checks never left initializing")
        for instance_id, status in statuses.items():
            mode = launched[instance_id]
            with self.subTest(status_mode=mode, phase="after"):
                expected_status, reachability = modes[mode]
                for check in ("InstanceStatus", "SystemStatus"):
                    self.assertEqual(status[check]["Status"], expected_status)
                    detail = status[check]["Details"][0]
                    self.assertEqual((detail["Name"], detail["Status"]), ("reachability", reachability))
                    # EC2 dates a failed check, and only a failed one.
                    if mode == "impaired":
                        since = (detail["ImpairedSince"] - launched_at).total_seconds()
                        self.assertTrue(-2 < since < 2 + 2 * WINDOW_S, detail["ImpairedSince"])
                    else:
                        self.assertNotIn("ImpairedSince", detail)
                # Impaired checks change nothing else: the instance is running and listed without IncludeAllInstances.
                running_only = self.ec2.describe_instance_status(InstanceIds=[instance_id])["InstanceStatuses"]
                self.assertEqual(running_only[0]["InstanceStatus"]["Status"], expected_status)
        self.ec2.terminate_instances(InstanceIds=list(launched))

    # -- ClientToken idempotency --------------------------------------------------------

    def test_client_token_idempotency(self) -> None:
        token = "acode-test-token-1"
        first = self.run_instance(ClientToken=token)
        again = self.run_instance(ClientToken=token)
        self.assertEqual(first["ReservationId"], again["ReservationId"])
        self.assertEqual(first["Instances"][0]["InstanceId"], again["Instances"][0]["InstanceId"])
        instance_id = first["Instances"][0]["InstanceId"]
        self.assertEqual(self.describe(instance_id)["ClientToken"], token)
        # The replay shows the current state, no longer the launch-time "pending".
        self.assertEqual(again["Instances"][0]["State"]["Name"], "running")

        by_token = self.ec2.describe_instances(Filters=[{"Name": "client-token", "Values": [token]}])["Reservations"]
        self.assertEqual([i["InstanceId"] for r in by_token for i in r["Instances"]], [instance_id])
        combined = self.ec2.describe_instances(
            Filters=[
                {"Name": "client-token", "Values": [token]},
                {"Name": "instance-state-name", "Values": ["terminated"]},
            ]
        )["Reservations"]
        self.assertEqual(combined, [])
        unknown = self.ec2.describe_instances(Filters=[{"Name": "client-token", "Values": ["no-such-token"]}])
        self.assertEqual(unknown["Reservations"], [])

        self.assert_error(
            lambda: self.run_instance(ClientToken=token, SubnetId=self.ready["subnets"]["us-east-1b"]),
            "IdempotentParameterMismatch",
            400,
        )
        self.ec2.terminate_instances(InstanceIds=[instance_id])
        self.assert_error(lambda: self.run_instance(ClientToken=token), "IdempotentInstanceTerminated", 400)

    def test_instance_profiles(self) -> None:
        arn = self.control("POST", "/instance_profiles", {"name": "agent"})["arn"]
        self.assertEqual(arn, "arn:aws:iam::123456789012:instance-profile/agent")
        self.assertEqual(self.control("POST", "/instance_profiles", {"name": "agent"})["arn"], arn)
        instance_id = self.run_instance(IamInstanceProfile={"Arn": arn})["Instances"][0]["InstanceId"]
        self.assertEqual(self.describe(instance_id)["IamInstanceProfile"]["Arn"], arn)
        unknown = "arn:aws:iam::123456789012:instance-profile/nobody"
        with self.assertRaises(ClientError):
            self.run_instance(IamInstanceProfile={"Arn": unknown})
        for body in ({}, {"name": ""}, {"name": "x", "colour": 1}):
            self.control("POST", "/instance_profiles", body, expect=400)
        self.ec2.terminate_instances(InstanceIds=[instance_id])

    # -- console output ---------------------------------------------------------------------

    def test_console_output_modes(self) -> None:
        self.control("POST", "/config", {"console_lag_s": WINDOW_S})
        instance_id = self.run_instance()["Instances"][0]["InstanceId"]
        self.assertIsNone(self.console_text(instance_id))
        text = wait_for(lambda: self.console_text(instance_id))
        self.assertIsNotNone(text)
        with self.assertRaises(UnicodeDecodeError):
            text.decode("utf-8")
        self.assertIn(b"\r\n", text)
        lines = text.decode("latin-1").split("\r\n")
        begin = lines.index("ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----")
        self.assertEqual(lines[begin - 1], "ec2: " + "#" * 61)
        fingerprints = [line.split()[2] for line in lines[begin + 1 : begin + 3]]
        self.assertEqual(fingerprints, self.ready["host_key_fingerprints"])
        self.assertRegex(lines[begin + 1], r"^ec2: 256 SHA256:\S+ root@ip-[\d-]+ \(ED25519\)$")
        self.assertRegex(lines[begin + 2], r"^ec2: 3072 SHA256:\S+ root@ip-[\d-]+ \(RSA\)$")
        keys_at = lines.index("-----BEGIN SSH HOST KEY KEYS-----")
        host_keys = [p.read_text().split()[:2] for p in sorted(self.state_dir.glob("ssh_host_*_key.pub"))]
        console_keys = [line.split()[:2] for line in lines[keys_at + 1 : keys_at + 3]]
        self.assertEqual(sorted(console_keys), sorted(host_keys))
        self.assertEqual(lines[keys_at + 3], "-----END SSH HOST KEY KEYS-----")

        self.control("POST", "/config", {"console_mode": "wrong-fingerprint"})
        wrong = self.console_text(instance_id).decode("latin-1")
        self.assertIn("BEGIN SSH HOST KEY FINGERPRINTS", wrong)
        for fingerprint in self.ready["host_key_fingerprints"]:
            self.assertNotIn(fingerprint, wrong)
        for _key_type, blob in host_keys:
            self.assertNotIn(blob, wrong)

        self.control("POST", "/config", {"console_mode": "no-keys"})
        bare = self.console_text(instance_id)
        self.assertIsNotNone(bare)
        self.assertNotIn(b"BEGIN SSH HOST KEY", bare)

        self.control("POST", "/config", {"console_mode": "not-base64"})
        garbled = self.ec2.get_console_output(InstanceId=instance_id)["Output"]
        with self.assertRaises(ValueError):
            base64.b64decode(garbled, validate=True)

        unknown = "i-0123456789abcdef0"
        self.assert_error(lambda: self.ec2.get_console_output(InstanceId=unknown), "InvalidInstanceID.NotFound", 400)

    # -- address modes -------------------------------------------------------------------

    def test_address_modes(self) -> None:
        session = "addresses-1"
        tags = [{"ResourceType": "instance", "Tags": [{"Key": "acode-session-id", "Value": session}]}]
        launched = {}
        for mode in ("public", "private-only", "private-loopback"):
            self.control("POST", "/config", {"address_mode": mode})
            answer = self.run_instance(TagSpecifications=tags)["Instances"][0]
            launched[answer["InstanceId"]] = (mode, answer)
        # Snapshotted at launch: a later config change moves no existing instance.
        self.control("POST", "/config", {"address_mode": "public"})

        by_tag = self.ec2.describe_instances(Filters=[{"Name": "tag:acode-session-id", "Values": [session]}])
        filtered = {i["InstanceId"]: i for r in by_tag["Reservations"] for i in r["Instances"]}
        self.assertEqual(set(filtered), set(launched))
        lab_view = {i["instance_id"]: i for i in self.control("GET", "/instances")}
        for instance_id, (mode, run_answer) in launched.items():
            with self.subTest(address_mode=mode):
                described = self.describe(instance_id)
                private_ip = described["PrivateIpAddress"]
                public_ip = described.get("PublicIpAddress")
                if mode == "public":
                    self.assertTrue(public_ip.startswith("54."), public_ip)
                    self.assertIn(public_ip.replace(".", "-"), described["PublicDnsName"])
                    self.assertEqual(described["NetworkInterfaces"][0]["Association"]["PublicIp"], public_ip)
                else:
                    self.assertIsNone(public_ip)
                    self.assertIn(described.get("PublicDnsName"), (None, ""))
                    # No public IP, no association (moto's empty <association/> is dropped, as EC2 omits it).
                    self.assertNotIn("Association", described["NetworkInterfaces"][0])
                    self.assertNotIn("Association", run_answer["NetworkInterfaces"][0])
                if mode == "private-loopback":
                    self.assertEqual(private_ip, "127.0.0.1")
                else:
                    self.assertTrue(private_ip.startswith("172.31."), private_ip)
                self.assertEqual(described["PrivateDnsName"], f"ip-{private_ip.replace('.', '-')}.ec2.internal")
                self.assertEqual(described["NetworkInterfaces"][0]["PrivateIpAddress"], private_ip)

                # The RunInstances answer, filtered answers and /_lab/instances all agree.
                for other in (run_answer, filtered[instance_id]):
                    self.assertEqual(other["PrivateIpAddress"], private_ip)
                    self.assertEqual(other.get("PublicIpAddress"), public_ip)
                row = lab_view[instance_id]
                self.assertEqual((row["private_ip"], row["public_ip"]), (private_ip, public_ip))
                by_private = self.ec2.describe_instances(
                    Filters=[
                        {"Name": "private-ip-address", "Values": [private_ip]},
                        {"Name": "tag:acode-session-id", "Values": [session]},
                    ]
                )["Reservations"]
                self.assertEqual([i["InstanceId"] for r in by_private for i in r["Instances"]], [instance_id])
                if public_ip:
                    by_public = self.ec2.describe_instances(Filters=[{"Name": "ip-address", "Values": [public_ip]}])
                    self.assertEqual(by_public["Reservations"][0]["Instances"][0]["InstanceId"], instance_id)

                # The console's hostname is built from the private IP the instance shows.
                text = wait_for(lambda: self.console_text(instance_id))
                self.assertIn(f"root@ip-{private_ip.replace('.', '-')} (ED25519)".encode(), text)

        # The mode wins over a request for a public IP.
        self.control("POST", "/config", {"address_mode": "private-only"})
        asked = {"DeviceIndex": 0, "SubnetId": self.ready["subnets"]["us-east-1a"], "AssociatePublicIpAddress": True}
        # NetworkInterfaces exclude SubnetId, so not run_instance().
        no_public = self.ec2.run_instances(
            ImageId=self.ready["ami_id"], MinCount=1, MaxCount=1, NetworkInterfaces=[asked], TagSpecifications=tags
        )["Instances"][0]
        launched[no_public["InstanceId"]] = ("private-only", no_public)
        self.assertNotIn("PublicIpAddress", self.describe(no_public["InstanceId"]))

        # private-loopback: the private address reaches the lab's sshd (on sshd_port).
        loopback_id = next(i for i, (mode, _) in launched.items() if mode == "private-loopback")
        self.assertTrue(self.ssh_banner(self.describe(loopback_id)["PrivateIpAddress"]).startswith(b"SSH-2.0-"))
        self.ec2.terminate_instances(InstanceIds=list(launched))

    # -- ssh ------------------------------------------------------------------------------

    def ssh_true(self, key_path: Path, known_hosts: Path) -> subprocess.CompletedProcess:
        return self.ssh_run(key_path, known_hosts, "true")

    def ssh_run(self, key_path: Path, known_hosts: Path, command: str) -> subprocess.CompletedProcess:
        """Runs `command` on "the instance": the lab's sshd, so on this machine, as ssh_user."""
        return subprocess.run(
            [
                "ssh", "-F", "/dev/null", "-i", str(key_path), "-p", str(self.ready["sshd_port"]),
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
                f"{self.ready['ssh_user']}@127.0.0.1", command,
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )

    def known_hosts_from_console(self, instance_id: str) -> Path:
        """What the engine does: trust exactly the keys the console printed."""
        lines = self.console_text(instance_id).decode("latin-1").split("\r\n")
        start = lines.index("-----BEGIN SSH HOST KEY KEYS-----") + 1
        end = lines.index("-----END SSH HOST KEY KEYS-----")
        path = self.tmp_path / f"known_hosts_{instance_id}"
        port = self.ready["sshd_port"]
        path.write_text("".join(f"[127.0.0.1]:{port} {' '.join(l.split()[:2])}\n" for l in lines[start:end]))
        return path

    def test_ssh_with_created_and_imported_keys(self) -> None:
        headers = {"ed25519": "-----BEGIN OPENSSH PRIVATE KEY-----", "rsa": "-----BEGIN RSA PRIVATE KEY-----"}
        for key_type, header in headers.items():
            with self.subTest(key_type=key_type):
                name = f"acode-ssh-{key_type}"
                material = self.ec2.create_key_pair(KeyName=name, KeyType=key_type)["KeyMaterial"]
                self.assertTrue(material.startswith(header), material[:40])
                # Listed by the control API even while DescribeKeyPairs is faulted.
                self.control("POST", "/faults", {"action": "DescribeKeyPairs", "code": "InternalError"})
                self.assertIn(name, self.control("GET", "/key_pairs"))
                self.control("DELETE", "/faults")
                key_path = self.tmp_path / name
                key_path.write_text(material)
                key_path.chmod(0o600)
                instance_id = self.run_instance(KeyName=name)["Instances"][0]["InstanceId"]
                self.wait_state(instance_id, "running")
                result = self.ssh_true(key_path, self.known_hosts_from_console(instance_id))
                self.assertEqual(result.returncode, 0, result.stderr)

        imported = self.tmp_path / "imported"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(imported)], check=True)
        public_line = imported.with_suffix(".pub").read_text().strip()
        self.ec2.import_key_pair(KeyName="acode-imported", PublicKeyMaterial=public_line.encode())
        instance_id = self.run_instance(KeyName="acode-imported")["Instances"][0]["InstanceId"]
        installed = self.control("GET", "/authorized_keys")
        self.assertIn(public_line.split()[1], " ".join(installed))
        self.wait_state(instance_id, "running")
        self.assertEqual(self.ssh_true(imported, self.known_hosts_from_console(instance_id)).returncode, 0)

        self.control("POST", "/config", {"console_mode": "wrong-fingerprint"})
        mitm = self.ssh_true(imported, self.known_hosts_from_console(instance_id))
        self.assertNotEqual(mitm.returncode, 0)
        self.assertIn("REMOTE HOST IDENTIFICATION HAS CHANGED", mitm.stderr)

        self.assert_error(lambda: self.run_instance(KeyName="no-such-key"), "InvalidKeyPair.NotFound", 400)

    def test_ssh_start_delay_and_refuse_windows(self) -> None:
        self.control("POST", "/config", {"ssh_start_delay_s": WINDOW_S})
        self.run_instance()
        with self.assertRaises(ConnectionRefusedError):
            self.ssh_banner()
        self.assertTrue(wait_for(lambda: self._banner_or_none(), timeout_s=5))

        self.control("POST", "/config", {"ssh_start_delay_s": 0, "ssh_refuse_s": WINDOW_S})
        self.run_instance()
        with self.assertRaises(ConnectionResetError):
            self.ssh_banner()
        self.assertTrue(wait_for(lambda: self._banner_or_none(), timeout_s=5))

    def _banner_or_none(self) -> bytes | None:
        try:
            banner = self.ssh_banner()
        except OSError:
            return None
        return banner if banner.startswith(b"SSH-2.0-OpenSSH") else None

    # -- spot and IMDS -------------------------------------------------------------------

    def test_spot_scores_prices_and_modes(self) -> None:
        scores = self.ec2.get_spot_placement_scores(
            InstanceTypes=["t3.micro"], TargetCapacity=1, SingleAvailabilityZone=True, RegionNames=["us-east-1"]
        )["SpotPlacementScores"]
        zone_ids = {z["ZoneName"]: z["ZoneId"] for z in self.ec2.describe_availability_zones()["AvailabilityZones"]}
        self.assertEqual(
            scores,
            [
                {"Region": "us-east-1", "AvailabilityZoneId": zone_ids["us-east-1a"], "Score": 9},
                {"Region": "us-east-1", "AvailabilityZoneId": zone_ids["us-east-1b"], "Score": 3},
            ],
        )
        self.control("POST", "/config", {"placement_scores": {"us-east-1b": 10}})
        scores = self.ec2.get_spot_placement_scores(
            InstanceTypes=["t3.micro"], TargetCapacity=1, SingleAvailabilityZone=True
        )["SpotPlacementScores"]
        self.assertEqual([s["Score"] for s in scores], [10])
        self.assertTrue(self.ec2.describe_spot_price_history(InstanceTypes=["t3.micro"])["SpotPriceHistory"])

        # RequestSpotInstances: open, then fulfilled after spot_fulfill_delay_s.
        self.control("POST", "/config", {"spot_fulfill_delay_s": WINDOW_S})
        subnet_b = self.ready["subnets"]["us-east-1b"]
        spec = {"ImageId": self.ready["ami_id"], "InstanceType": "t3.micro", "SubnetId": subnet_b}
        request = self.ec2.request_spot_instances(SpotPrice="0.05", LaunchSpecification=spec)["SpotInstanceRequests"][0]
        request_id = request["SpotInstanceRequestId"]
        self.assertEqual(request["State"], "open")
        self.assertNotIn("InstanceId", request)

        self.assertEqual(self.spot_request(request_id)["Status"]["Code"], "pending-fulfillment")
        fulfilled = wait_for(lambda: (r := self.spot_request(request_id))["Status"]["Code"] == "fulfilled" and r)
        self.assertEqual(fulfilled["State"], "active")
        self.assertEqual(self.describe(fulfilled["InstanceId"])["InstanceLifecycle"], "spot")

        # Capacity errors: requests stay open with the status code; RunInstances spot fails.
        spot_market = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time"}}
        for mode, code, status in (
            ("capacity-not-available", "InsufficientInstanceCapacity", 500),
            ("price-too-low", "SpotMaxPriceTooLow", 400),
        ):
            with self.subTest(spot_mode=mode):
                self.control("POST", "/config", {"spot_mode": mode, "spot_fulfill_delay_s": 0})
                requested = self.ec2.request_spot_instances(LaunchSpecification=spec)["SpotInstanceRequests"]
                rid = requested[0]["SpotInstanceRequestId"]
                waiting = self.spot_request(rid)
                self.assertEqual((waiting["State"], waiting["Status"]["Code"]), ("open", mode))
                self.assert_error(lambda: self.run_instance(InstanceMarketOptions=spot_market), code, status)
                cancelled = self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[rid])
                self.assertEqual(cancelled["CancelledSpotInstanceRequests"][0]["State"], "cancelled")
                after = self.spot_request(rid)
                self.assertEqual(after["State"], "cancelled")
                self.assertEqual(after["Status"]["Code"], "canceled-before-fulfillment")

        # RunInstances with spot market options: a spot instance backed by a spot request.
        self.control("POST", "/config", {"spot_mode": "fulfilled"})
        spot_instance = self.run_instance(InstanceMarketOptions=spot_market)["Instances"][0]
        self.assertEqual(spot_instance["InstanceLifecycle"], "spot")
        backing = self.spot_request(spot_instance["SpotInstanceRequestId"])
        self.assertEqual(backing["InstanceId"], spot_instance["InstanceId"])
        spot_only = self.ec2.describe_instances(Filters=[{"Name": "instance-lifecycle", "Values": ["spot"]}])
        spot_ids = {i["InstanceId"] for r in spot_only["Reservations"] for i in r["Instances"]}
        self.assertIn(spot_instance["InstanceId"], spot_ids)
        self.assertNotIn(self.run_instance()["Instances"][0]["InstanceId"], spot_ids)
        lifecycles = {i["instance_id"]: i["lifecycle"] for i in self.control("GET", "/instances")}
        self.assertEqual(lifecycles[spot_instance["InstanceId"]], "spot")

        # Interruption: request status and IMDS instance-action.
        token = self.imds("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[1]
        action_path = "/latest/meta-data/spot/instance-action"
        # Per instance: other tests' notices show in the lab-wide (header-less) answer.
        self.assertEqual(self.instance_action(token, spot_instance["InstanceId"]), (404, None))
        result = self.control("POST", "/spot/interrupt", {"instance_id": spot_instance["InstanceId"]})
        self.assertEqual(result["marked_requests"], [spot_instance["SpotInstanceRequestId"]])
        marked = self.spot_request(result["marked_requests"][0])
        self.assertEqual(marked["Status"]["Code"], "marked-for-termination")
        status, body = self.imds("GET", action_path, {"X-aws-ec2-metadata-token": token})
        self.assertEqual(status, 200)
        action = json.loads(body)
        self.assertEqual(action["action"], "terminate")
        when = datetime.datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        ahead = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        self.assertTrue(100 < ahead <= 120, ahead)

    def test_imds_token_rules(self) -> None:
        self.assertEqual(self.imds("PUT", "/latest/api/token", {})[0], 400)
        self.assertEqual(self.imds("GET", "/latest/meta-data/instance-id", {})[0], 401)
        forged = {"X-aws-ec2-metadata-token": "forged"}
        self.assertEqual(self.imds("GET", "/latest/meta-data/instance-id", forged)[0], 401)
        instance_id = self.run_instance()["Instances"][0]["InstanceId"]
        status, token = self.imds("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        self.assertEqual(status, 200)
        self.assertEqual(
            self.imds("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": token}), (200, instance_id)
        )

    # -- prices ----------------------------------------------------------------------------

    def price_history(self, **params) -> list[dict]:
        return self.ec2.describe_spot_price_history(**params)["SpotPriceHistory"]

    def test_spot_price_history(self) -> None:
        linux = {"InstanceTypes": ["t3.micro"], "ProductDescriptions": ["Linux/UNIX"]}
        history = self.price_history(**linux)
        zones = sorted(DEFAULT_SPOT_PRICES)
        self.assertEqual(sorted({h["AvailabilityZone"] for h in history}), zones)
        self.assertEqual({(h["InstanceType"], h["ProductDescription"]) for h in history}, {("t3.micro", "Linux/UNIX")})
        stamps = [h["Timestamp"] for h in history]
        self.assertEqual(stamps, sorted(stamps, reverse=True), "latest first")
        self.assertGreater(len(history), len(zones), "a few points per zone")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertTrue(all(now - datetime.timedelta(hours=12) < t <= now for t in stamps), stamps)
        # The newest point of each zone carries the configured price.
        newest = {}
        for h in history:
            newest.setdefault(h["AvailabilityZone"], h["SpotPrice"])
        self.assertEqual(newest, {az: f"{price:.6f}" for az, price in DEFAULT_SPOT_PRICES.items()})

        # StartTime=now: only the price in effect, so one item per zone, type and description.
        current = self.price_history(AvailabilityZone="us-east-1b", StartTime=now, **linux)
        self.assertEqual([(h["AvailabilityZone"], h["SpotPrice"]) for h in current], [("us-east-1b", "0.003100")])
        # A window in the past: the points inside it plus the one in effect at its start.
        zone_points = [h["Timestamp"] for h in history if h["AvailabilityZone"] == "us-east-1b"]
        after_third = zone_points[2] + datetime.timedelta(minutes=1)
        window = self.price_history(
            AvailabilityZone="us-east-1b", StartTime=after_third, EndTime=zone_points[1], **linux
        )
        self.assertEqual([h["Timestamp"] for h in window], zone_points[1:3])
        old = self.price_history(AvailabilityZone="us-east-1b", EndTime=zone_points[-1], **linux)
        self.assertEqual([h["Timestamp"] for h in old], zone_points[-1:])

        # Filters, with EC2's wildcards; no InstanceTypes means every type in on_demand_prices.
        filtered = self.price_history(
            Filters=[
                {"Name": "availability-zone", "Values": ["us-east-1a", "us-east-1c"]},
                {"Name": "instance-type", "Values": ["t3.*"]},
                {"Name": "product-description", "Values": ["Linux/UNIX (Amazon VPC)"]},
            ]
        )
        self.assertEqual({h["AvailabilityZone"] for h in filtered}, {"us-east-1a", "us-east-1c"})
        self.assertEqual({h["InstanceType"] for h in filtered}, {"t3.micro", "t3.small", "t3.medium"})
        self.assertEqual({h["ProductDescription"] for h in filtered}, {"Linux/UNIX (Amazon VPC)"})
        self.assertEqual(self.price_history(ProductDescriptions=["Windows"]), [])
        by_price = self.price_history(Filters=[{"Name": "spot-price", "Values": ["0.003100"]}], **linux)
        self.assertEqual([(h["AvailabilityZone"], h["Timestamp"]) for h in by_price], [("us-east-1b", zone_points[0])])
        self.assert_error(
            lambda: self.price_history(Filters=[{"Name": "colour", "Values": ["red"]}]), "InvalidParameterValue", 400
        )

        # Pages: every item once, the last page without a token (EC2 sends an empty <nextToken/>).
        paginator = self.ec2.get_paginator("describe_spot_price_history")
        pages = list(paginator.paginate(PaginationConfig={"PageSize": 7}, **linux))
        self.assertGreater(len(pages), 1)
        self.assertEqual([h for page in pages for h in page["SpotPriceHistory"]], history)
        self.assertIn(pages[-1].get("NextToken"), (None, ""))

        # A new map replaces the old one; its prices are the newest points.
        self.control("POST", "/config", {"spot_prices": {"us-east-1d": 0.0123}})
        changed = self.price_history(StartTime=datetime.datetime.now(datetime.timezone.utc), **linux)
        self.assertEqual([(h["AvailabilityZone"], h["SpotPrice"]) for h in changed], [("us-east-1d", "0.012300")])
        self.assertGreaterEqual(changed[0]["Timestamp"], history[0]["Timestamp"])

    def test_price_and_score_faults_and_counters(self) -> None:
        self.control("POST", "/counters/reset")
        self.control("POST", "/faults", {"action": "DescribeSpotPriceHistory", "code": "InternalError"})
        self.assert_error(lambda: self.price_history(InstanceTypes=["t3.micro"]), "InternalError", 500)
        self.assertTrue(self.price_history(InstanceTypes=["t3.micro"]))
        self.control("POST", "/faults", {"action": "GetSpotPlacementScores", "code": "UnauthorizedOperation"})
        scores = {"InstanceTypes": ["t3.micro"], "TargetCapacity": 1, "SingleAvailabilityZone": True}
        self.assert_error(lambda: self.ec2.get_spot_placement_scores(**scores), "UnauthorizedOperation", 400)
        self.control(
            "POST", "/faults", {"action": "GetSpotPlacementScores", "code": "UnauthorizedOperation", "http_status": 403}
        )
        self.assert_error(lambda: self.ec2.get_spot_placement_scores(**scores), "UnauthorizedOperation", 403)
        self.assertTrue(self.ec2.get_spot_placement_scores(**scores)["SpotPlacementScores"])
        self.assertEqual(
            self.control("GET", "/counters"), {"DescribeSpotPriceHistory": 2, "GetSpotPlacementScores": 3}
        )

    def pricing(self):
        return boto3.client(
            "pricing",
            endpoint_url=self.ready["ec2_endpoint"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
        )

    def products(self, fields: dict[str, str], **params) -> list[dict]:
        filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in fields.items()]
        answer = self.pricing().get_products(ServiceCode="AmazonEC2", Filters=filters, FormatVersion="aws_v1", **params)
        self.assertEqual(answer["FormatVersion"], "aws_v1")
        # Every entry is a JSON document in a string, as in AWS.
        return [json.loads(entry) for entry in answer["PriceList"]]

    def on_demand_usd(self, product: dict) -> str:
        (term,) = product["terms"]["OnDemand"].values()
        (dimension,) = term["priceDimensions"].values()
        self.assertEqual(dimension["unit"], "Hrs")
        return dimension["pricePerUnit"]["USD"]

    def test_pricing_get_products(self) -> None:
        self.control("POST", "/counters/reset")
        (product,) = self.products({"instanceType": "t3.micro", **EC2_PRICE_FILTERS})
        self.assertEqual(product["serviceCode"], "AmazonEC2")
        self.assertEqual(product["product"]["productFamily"], "Compute Instance")
        attributes = product["product"]["attributes"]
        self.assertEqual(attributes["instanceType"], "t3.micro")
        for field, value in EC2_PRICE_FILTERS.items():
            self.assertEqual(attributes[field], value)
        self.assertEqual(self.on_demand_usd(product), "0.0104000000")
        term_code, term = next(iter(product["terms"]["OnDemand"].items()))
        sku = product["product"]["sku"]
        self.assertEqual(term_code, f"{sku}.JRTCKXETXF")
        self.assertEqual(list(term["priceDimensions"]), [f"{sku}.JRTCKXETXF.6YS6EN2CT7"])

        # No match: an unknown type, another region, another service.
        self.assertEqual(self.products({"instanceType": "x9.nonesuch", **EC2_PRICE_FILTERS}), [])
        elsewhere = {"instanceType": "t3.micro", **EC2_PRICE_FILTERS, "regionCode": "eu-west-1"}
        self.assertEqual(self.products(elsewhere), [])
        other = self.pricing().get_products(ServiceCode="AmazonRDS")
        self.assertEqual(other["PriceList"], [])
        # Without the capacitystatus filter a client sees capacity-reservation rows too, as in AWS.
        loose = {k: v for k, v in EC2_PRICE_FILTERS.items() if k != "capacitystatus"}
        loose_products = self.products({"instanceType": "t3.micro", **loose})
        statuses = {p["product"]["attributes"]["capacitystatus"] for p in loose_products}
        self.assertEqual(statuses, {"Used", "UnusedCapacityReservation", "AllocatedCapacityReservation"})
        # Pages.
        first = self.pricing().get_products(ServiceCode="AmazonEC2", MaxResults=3)
        self.assertEqual(len(first["PriceList"]), 3)
        second = self.pricing().get_products(ServiceCode="AmazonEC2", MaxResults=3, NextToken=first["NextToken"])
        self.assertNotEqual(first["PriceList"], second["PriceList"])

        self.control("POST", "/config", {"on_demand_prices": {"c7g.large": 0.0725}})
        (arm,) = self.products({"instanceType": "c7g.large", **EC2_PRICE_FILTERS})
        self.assertEqual(self.on_demand_usd(arm), "0.0725000000")
        self.assertEqual(self.products({"instanceType": "t3.micro", **EC2_PRICE_FILTERS}), [])

        # Faults in the JSON protocol's shape.
        self.control("POST", "/faults", {"action": "GetProducts", "code": "AccessDeniedException", "message": "no"})
        with self.assertRaises(ClientError) as caught:
            self.products({"instanceType": "c7g.large"})
        error = caught.exception.response
        self.assertEqual(error["Error"], {"Code": "AccessDeniedException", "Message": "no"})
        self.assertEqual(error["ResponseMetadata"]["HTTPStatusCode"], 400)
        self.assertEqual(error["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"], "AccessDeniedException")
        self.control("POST", "/faults", {"action": "GetProducts", "code": "ThrottlingException"})
        with self.assertRaises(ClientError) as caught:
            self.products({"instanceType": "c7g.large"})
        self.assertEqual(caught.exception.response["Error"]["Code"], "ThrottlingException")
        self.assertEqual(self.control("GET", "/counters"), {"GetProducts": 11})

    # -- spot fulfilment, cancel race, interruption and reclaim ------------------------------------

    def test_spot_launch_waits_for_fulfilment(self) -> None:
        self.control("POST", "/config", {"spot_fulfill_delay_s": WINDOW_S, "boot_delay_s": 2 * WINDOW_S})
        launched = self.spot_launch()
        instance_id, request_id = launched["InstanceId"], launched["SpotInstanceRequestId"]
        self.assertEqual((launched["State"]["Name"], launched["InstanceLifecycle"]), ("pending", "spot"))
        described = self.describe(instance_id)
        self.assertEqual((described["SpotInstanceRequestId"], described["InstanceLifecycle"]), (request_id, "spot"))
        self.assertEqual(self.request_summary(request_id), ("open", "pending-fulfillment", None))
        request = self.spot_request(request_id)
        self.assertEqual(request["Status"]["Message"], "Your Spot request is pending fulfillment.")
        # No MaxPrice: the request shows its zone's spot price (us-east-1a).
        self.assertEqual(request["SpotPrice"], "0.003500")

        fulfilled = wait_for(lambda: self.request_summary(request_id)[1] == "fulfilled")
        self.assertTrue(fulfilled, "never fulfilled")
        self.assertEqual(self.request_summary(request_id), ("active", "fulfilled", instance_id))
        # boot_delay_s counts from fulfilment, so the instance is still pending.
        self.assertEqual(self.state(instance_id)[0], "pending")
        self.wait_state(instance_id, "running")

        # A MaxPrice is shown as given.
        priced = self.run_instance(
            InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {"MaxPrice": "0.05"}},
            SubnetId=self.ready["subnets"]["us-east-1b"],
        )["Instances"][0]
        self.assertEqual(self.spot_request(priced["SpotInstanceRequestId"])["SpotPrice"], "0.050000")
        self.ec2.terminate_instances(InstanceIds=[instance_id, priced["InstanceId"]])

    def test_spot_cancel_before_fulfilment_and_the_race(self) -> None:
        # A long delay: every cancel here comes before the fulfilment.
        self.control("POST", "/config", {"spot_fulfill_delay_s": 30})
        lost = self.spot_launch()
        self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[lost["SpotInstanceRequestId"]])
        self.assertEqual(
            self.request_summary(lost["SpotInstanceRequestId"]), ("cancelled", "canceled-before-fulfillment", None)
        )
        self.wait_state(lost["InstanceId"], "terminated")
        # Terminated while its request waits: the request closes. Unfulfilled, it cannot be interrupted.
        waiting = self.spot_launch()
        self.control("POST", "/interrupt", {"instance_id": waiting["InstanceId"]}, expect=400)
        self.ec2.terminate_instances(InstanceIds=[waiting["InstanceId"]])
        self.assertEqual(
            self.request_summary(waiting["SpotInstanceRequestId"]), ("closed", "instance-terminated-by-user", None)
        )

        # The race: the fulfilment wins; the instance runs on although its request is cancelled.
        self.control("POST", "/config", {"spot_cancel_race": True})
        raced = self.spot_launch()
        self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[raced["SpotInstanceRequestId"]])
        self.assertEqual(
            self.request_summary(raced["SpotInstanceRequestId"]),
            ("cancelled", "request-canceled-and-instance-running", raced["InstanceId"]),
        )
        self.wait_state(raced["InstanceId"], "running")
        # A RequestSpotInstances request races the same way: its instance is launched at the cancel.
        subnet_c = self.ready["subnets"]["us-east-1c"]
        spec = {"ImageId": self.ready["ami_id"], "InstanceType": "t3.micro", "SubnetId": subnet_c}
        asked = self.ec2.request_spot_instances(LaunchSpecification=spec)["SpotInstanceRequests"][0]
        self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[asked["SpotInstanceRequestId"]])
        state, code, requested_id = self.request_summary(asked["SpotInstanceRequestId"])
        self.assertEqual((state, code), ("cancelled", "request-canceled-and-instance-running"))
        self.assertEqual(self.describe(requested_id)["SpotInstanceRequestId"], asked["SpotInstanceRequestId"])
        self.assertEqual(self.spot_request(asked["SpotInstanceRequestId"])["SpotPrice"], "0.004000")  # us-east-1c
        self.wait_state(requested_id, "running")
        # A client that only cancels leaks both; one that also terminates does not.
        time.sleep(WINDOW_S)
        self.assertEqual(self.state(raced["InstanceId"])[0], "running")
        self.ec2.terminate_instances(InstanceIds=[raced["InstanceId"], requested_id])
        self.wait_state(raced["InstanceId"], "terminated")
        self.wait_state(requested_id, "terminated")

        # Without capacity nothing can win the race.
        self.control("POST", "/config", {"spot_mode": "capacity-not-available"})
        starved = self.ec2.request_spot_instances(LaunchSpecification=spec)["SpotInstanceRequests"][0]
        self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[starved["SpotInstanceRequestId"]])
        self.assertEqual(
            self.request_summary(starved["SpotInstanceRequestId"]), ("cancelled", "canceled-before-fulfillment", None)
        )

    def test_per_instance_interruption_and_reclaim(self) -> None:
        self.control("POST", "/config", {"terminate_delay_s": WINDOW_S})
        doomed, spared = self.spot_launch(), self.spot_launch()
        on_demand = self.run_instance()["Instances"][0]["InstanceId"]
        for instance in (doomed, spared):
            self.wait_state(instance["InstanceId"], "running")
        token = self.imds_token()
        self.assertEqual(self.instance_action(token, doomed["InstanceId"]), (404, None))

        answer = self.control("POST", "/interrupt", {"instance_id": doomed["InstanceId"], "notice_s": 2 * WINDOW_S})
        noticed_at = datetime.datetime.now(datetime.timezone.utc)
        self.assertEqual(answer["marked_requests"], [doomed["SpotInstanceRequestId"]])
        self.assertEqual(answer["instance_ids"], [doomed["InstanceId"]])
        marked = self.request_summary(doomed["SpotInstanceRequestId"])
        self.assertEqual(marked[:2], ("active", "marked-for-termination"))
        self.assertEqual(self.request_summary(spared["SpotInstanceRequestId"])[:2], ("active", "fulfilled"))
        status, action = self.instance_action(token, doomed["InstanceId"])
        self.assertEqual((status, action["action"]), (200, "terminate"))
        when = datetime.datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        self.assertTrue(-2 < (when - noticed_at).total_seconds() <= 2 * WINDOW_S, action)
        # Only that instance has a notice; without the header, IMDS shows the latest notice.
        self.assertEqual(self.instance_action(token, spared["InstanceId"]), (404, None))
        self.assertEqual(self.instance_action(token, None), (200, action))

        # The notice runs out: shutting-down, then terminated; the request is closed.
        self.assertTrue(wait_for(lambda: self.state(doomed["InstanceId"])[0] == "shutting-down"))
        self.wait_state(doomed["InstanceId"], "terminated")
        self.assertEqual(
            self.request_summary(doomed["SpotInstanceRequestId"]),
            ("closed", "instance-terminated-by-price", doomed["InstanceId"]),
        )
        self.assertEqual(self.describe(doomed["InstanceId"])["StateReason"]["Code"], "Server.SpotInstanceTermination")
        self.assertEqual(self.state(spared["InstanceId"])[0], "running")
        self.assertEqual(self.state(on_demand)[0], "running")

        # A stop notice stops the instance and disables its request.
        self.control("POST", "/interrupt", {"instance_id": spared["InstanceId"], "notice_s": 0, "action": "stop"})
        self.assertEqual(self.instance_action(token, spared["InstanceId"])[1]["action"], "stop")
        self.wait_state(spared["InstanceId"], "stopped")
        stopped = self.request_summary(spared["SpotInstanceRequestId"])
        self.assertEqual(stopped[:2], ("disabled", "instance-stopped-by-price"))
        # EC2 never interrupts on-demand instances.
        self.control("POST", "/interrupt", {"instance_id": on_demand}, expect=400)

        # Without instance_id: every live spot instance, each reclaimed when the notice runs out.
        fleet = [self.spot_launch()["InstanceId"] for _ in range(2)]
        answer = self.control("POST", "/spot/interrupt", {"notice_s": WINDOW_S})
        self.assertTrue(set(fleet) <= set(answer["instance_ids"]), answer)
        for instance_id in fleet:
            self.wait_state(instance_id, "terminated")
        self.assertEqual(self.state(on_demand)[0], "running")
        self.ec2.terminate_instances(InstanceIds=[on_demand, spared["InstanceId"]])

    def test_spot_reclaim_after_running(self) -> None:
        reclaim = {"spot_reclaim_after_running_s": WINDOW_S, "spot_reclaim_notice_s": 2 * WINDOW_S}
        self.control("POST", "/config", {"boot_delay_s": WINDOW_S, **reclaim})
        spot = self.spot_launch()
        on_demand = self.run_instance()["Instances"][0]["InstanceId"]
        spot_id, request_id = spot["InstanceId"], spot["SpotInstanceRequestId"]
        token = self.imds_token()
        self.assertEqual(self.instance_action(token, spot_id), (404, None))
        # IMDS alone moves the timeline: the notice appears without any EC2 call.
        self.assertTrue(wait_for(lambda: self.instance_action(token, spot_id)[0] == 200), "no notice")
        self.assertEqual(self.instance_action(token, spot_id)[1]["action"], "terminate")
        self.assertEqual(self.request_summary(request_id)[:2], ("active", "marked-for-termination"))
        self.assertEqual(self.state(spot_id)[0], "running")
        self.wait_state(spot_id, "terminated")
        self.assertEqual(self.request_summary(request_id)[:2], ("closed", "instance-terminated-by-price"))
        self.assertEqual(self.state(on_demand)[0], "running")
        self.assertEqual(self.instance_action(token, on_demand), (404, None))
        self.ec2.terminate_instances(InstanceIds=[on_demand])

    def test_imds_per_instance(self) -> None:
        first = self.run_instance()["Instances"][0]["InstanceId"]
        latest = self.run_instance()["Instances"][0]["InstanceId"]
        token = self.imds_token()
        path = "/latest/meta-data/instance-id"

        def get(instance_id: str | None, with_token: bool = True) -> tuple[int, str]:
            headers = {"X-aws-ec2-metadata-token": token} if with_token else {}
            if instance_id:
                headers["X-Acode-Instance-Id"] = instance_id
            return self.imds("GET", path, headers)

        self.assertEqual(get(first), (200, first))
        self.assertEqual(get(None), (200, latest))
        self.assertEqual(get("i-0123456789abcdef0")[0], 404)
        self.assertEqual(get(first, with_token=False)[0], 401)
        self.assertEqual(self.instance_action(token, first), (404, None))
        self.ec2.terminate_instances(InstanceIds=[first, latest])

    def test_imds_over_ssh_with_curl(self) -> None:
        """What the engine does: ask IMDS from "the instance", over SSH, with curl."""
        name = "acode-imds-curl"
        key_path = self.tmp_path / name
        key_path.write_text(self.ec2.create_key_pair(KeyName=name, KeyType="ed25519")["KeyMaterial"])
        key_path.chmod(0o600)
        spot = self.spot_launch(KeyName=name)["InstanceId"]
        self.wait_state(spot, "running")
        self.control("POST", "/interrupt", {"instance_id": spot})
        imds = self.ready["imds_endpoint"]
        script = (
            f"t=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' {imds}/latest/api/token) && "
            f"curl -sf -H \"X-aws-ec2-metadata-token: $t\" -H 'X-Acode-Instance-Id: {spot}' "
            f"{imds}/latest/meta-data/spot/instance-action"
        )
        result = self.ssh_run(key_path, self.known_hosts_from_console(spot), script)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["action"], "terminate")
        self.ec2.terminate_instances(InstanceIds=[spot])

    # -- ssh control ------------------------------------------------------------------------

    def test_ssh_control(self) -> None:
        self.assertEqual(self.control("GET", "/ssh"), {"mode": "auto", "effective": "open"})
        # Closed: refused from the control answer on, launch windows or not.
        self.assertEqual(self.control("POST", "/ssh", {"mode": "closed"})["effective"], "closed")
        with self.assertRaises(ConnectionRefusedError):
            self.ssh_banner()
        self.control("POST", "/ssh", {"mode": "reset"})
        with self.assertRaises(ConnectionResetError):
            self.ssh_banner()
        # Mid-handshake: sshd's version line comes through, the reset follows the client's first bytes.
        self.control("POST", "/ssh", {"mode": "reset-mid-handshake"})
        with socket.create_connection(("127.0.0.1", self.ready["sshd_port"]), timeout=5) as conn:
            self.assertTrue(conn.recv(256).startswith(b"SSH-2.0-"))
            conn.sendall(b"SSH-2.0-acode-lab-test\r\n")
            with self.assertRaises(ConnectionResetError):
                while conn.recv(4096):
                    pass
        # Silent: accepted, and not a byte, even after the client's version line.
        self.control("POST", "/ssh", {"mode": "silent"})
        with socket.create_connection(("127.0.0.1", self.ready["sshd_port"]), timeout=0.5) as conn:
            conn.sendall(b"SSH-2.0-acode-lab-test\r\n")
            with self.assertRaises(TimeoutError):
                conn.recv(256)
        self.control("POST", "/ssh", {"mode": "open"})
        self.assertTrue(wait_for(self._banner_or_none))
        # Open overrides the launch windows; auto gives them back.
        self.control("POST", "/config", {"ssh_start_delay_s": 30})
        self.run_instance()
        self.assertTrue(self.ssh_banner().startswith(b"SSH-"))
        self.control("POST", "/ssh", {"mode": "auto"})
        with self.assertRaises(ConnectionRefusedError):
            self.ssh_banner()
        self.control("POST", "/config", {"ssh_start_delay_s": 0})
        self.assertTrue(wait_for(self._banner_or_none))

        # A live session survives "closed" unless the sessions are dropped.
        with socket.create_connection(("127.0.0.1", self.ready["sshd_port"]), timeout=5) as session:
            self.assertTrue(session.recv(64).startswith(b"SSH-"))
            self.control("POST", "/ssh", {"mode": "closed"})
            session.sendall(b"SSH-2.0-acode-lab-test\r\n")
            self.assertTrue(session.recv(4096), "sshd's key exchange")
            dropped = self.control("POST", "/ssh", {"mode": "closed", "drop_sessions": True})
            self.assertGreaterEqual(dropped["dropped_sessions"], 1)
            try:
                rest = session.recv(4096)
                while rest:
                    rest = session.recv(4096)
            except ConnectionResetError:
                pass
        self.control("POST", "/ssh", {"mode": "auto"})
        self.assertTrue(wait_for(self._banner_or_none))

    # -- faults and counters ----------------------------------------------------------------

    def test_error_faults(self) -> None:
        self.control("POST", "/faults", {"action": "DescribeInstances", "code": "RequestLimitExceeded", "count": 2})
        self.assertEqual(self.control("GET", "/faults")[0]["remaining"], 2)
        for _ in range(2):
            self.assert_error(self.ec2.describe_instances, "RequestLimitExceeded", 503)
        self.ec2.describe_instances()
        self.assertEqual(self.control("GET", "/faults"), [])

        self.control(
            "POST",
            "/faults",
            {"action": "DescribeImages", "code": "InvalidAMIID.Malformed", "message": "bad ami", "http_status": 409},
        )
        with self.assertRaises(ClientError) as caught:
            self.ec2.describe_images(ImageIds=[self.ready["ami_id"]])
        self.assertEqual(caught.exception.response["Error"], {"Code": "InvalidAMIID.Malformed", "Message": "bad ami"})
        self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"], 409)

        self.control("POST", "/faults", {"action": "DescribeInstances", "http_status": 503})
        with self.assertRaises(ClientError) as caught:
            self.ec2.describe_instances()
        self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"], 503)

        # Subnet and AZ scoping: only launches into the named subnet / zone fail.
        subnets = self.ready["subnets"]
        no_capacity = {"action": "RunInstances", "code": "InsufficientInstanceCapacity"}
        self.control("POST", "/faults", {**no_capacity, "subnet_id": subnets["us-east-1b"]})
        self.run_instance(SubnetId=subnets["us-east-1a"])
        self.assert_error(lambda: self.run_instance(SubnetId=subnets["us-east-1b"]), no_capacity["code"], 500)
        self.control("POST", "/faults", {**no_capacity, "availability_zone": "us-east-1c"})
        self.run_instance(SubnetId=subnets["us-east-1a"])
        self.assert_error(lambda: self.run_instance(SubnetId=subnets["us-east-1c"]), no_capacity["code"], 500)
        # Without a subnet, the zone comes from Placement.
        unavailable = {"action": "RunInstances", "code": "Unavailable", "availability_zone": "us-east-1d"}
        self.control("POST", "/faults", unavailable)
        placed = {"ImageId": self.ready["ami_id"], "MinCount": 1, "MaxCount": 1}
        placed["Placement"] = {"AvailabilityZone": "us-east-1d"}
        self.assert_error(lambda: self.ec2.run_instances(**placed), "Unavailable", 503)

    def test_latency_and_dropped_connections(self) -> None:
        self.control("POST", "/faults", {"action": "DescribeRegions", "latency_ms": 400})
        started = time.monotonic()
        self.ec2.describe_regions()
        self.assertGreaterEqual(time.monotonic() - started, 0.4)

        self.control("POST", "/faults", {"action": "DescribeRegions", "drop_connection": True})
        with self.assertRaises(ConnectionClosedError):
            self.ec2.describe_regions()
        self.ec2.describe_regions()

        # A lost RunInstances response: the instance exists; the retry with the same token finds it.
        token = "acode-lost-response"
        self.control("POST", "/faults", {"action": "RunInstances", "drop_connection": True, "when": "after"})
        with self.assertRaises(ConnectionClosedError):
            self.run_instance(ClientToken=token)
        launched = [i for i in self.control("GET", "/instances") if i["client_token"] == token]
        self.assertEqual(len(launched), 1)
        retried = self.run_instance(ClientToken=token)["Instances"][0]["InstanceId"]
        self.assertEqual(retried, launched[0]["instance_id"])

    def test_counters(self) -> None:
        self.control("POST", "/counters/reset")
        self.control("POST", "/faults", {"action": "DescribeRegions", "code": "InternalError"})
        self.assert_error(self.ec2.describe_regions, "InternalError", 500)
        self.ec2.describe_regions()
        self.ec2.describe_availability_zones()
        self.assertEqual(self.control("GET", "/counters"), {"DescribeRegions": 2, "DescribeAvailabilityZones": 1})
        # The SDK's own retries are calls too.
        self.control("POST", "/counters/reset")
        self.control("POST", "/faults", {"action": "DescribeRegions", "code": "RequestLimitExceeded"})
        self.client(max_attempts=2).describe_regions()
        self.assertEqual(self.control("GET", "/counters"), {"DescribeRegions": 2})

    def test_throttle_run_instances_bucket(self) -> None:
        self.control("POST", "/counters/reset")
        self.control("POST", "/config", {"throttle": {"run_instances": {"burst": 2, "per_s": 1}}})
        self.run_instance()
        self.run_instance()
        # A throttled call neither reaches moto nor uses up a fault rule.
        self.control("POST", "/faults", {"action": "RunInstances", "code": "InternalError"})
        before = len(self.control("GET", "/instances"))
        self.assert_error(self.run_instance, "RequestLimitExceeded", 503)
        self.assertEqual(len(self.control("GET", "/instances")), before)
        self.assertEqual(self.control("GET", "/faults")[0]["remaining"], 1)
        self.control("DELETE", "/faults")
        throttle = self.control("GET", "/throttle")
        self.assertEqual(throttle["config"], {"run_instances": {"burst": 2, "per_s": 1}})
        self.assertEqual(throttle["throttled"], {"RunInstances": 1})
        self.assertLess(throttle["tokens"]["run_instances"], 1)
        # Throttled calls are still calls EC2 received.
        self.assertEqual(self.control("GET", "/counters")["RunInstances"], 3)
        time.sleep(1.1)
        self.run_instance()
        self.control("POST", "/counters/reset")
        self.assertEqual(self.control("GET", "/throttle")["throttled"], {})

    def test_throttle_families_are_independent(self) -> None:
        slow = {"burst": 1, "per_s": 0.01}
        self.control("POST", "/config", {"throttle": {"run_instances": slow, "describe": {"burst": 3, "per_s": 0.01}}})
        instance_id = self.run_instance()["Instances"][0]["InstanceId"]
        self.assert_error(self.run_instance, "RequestLimitExceeded", 503)
        # run_instances is empty; the describe bucket still has its own tokens.
        self.describe(instance_id)
        self.ec2.describe_regions()
        self.ec2.get_console_output(InstanceId=instance_id)
        self.assert_error(self.ec2.describe_regions, "RequestLimitExceeded", 503)
        # mutating was left out of the config, so it is not throttled at all.
        for n in range(5):
            self.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "n", "Value": str(n)}])
        tokens = self.control("GET", "/throttle")["tokens"]
        self.assertEqual(set(tokens), {"run_instances", "describe"})
        self.assertTrue(all(level < 1 for level in tokens.values()), tokens)
        # The Price List API is not EC2's to throttle.
        self.assertTrue(self.products({"instanceType": "t3.micro", **EC2_PRICE_FILTERS}))

    def test_throttle_config(self) -> None:
        ec2_limits = {
            "run_instances": {"burst": 5, "per_s": 2},
            "mutating": {"burst": 50, "per_s": 5},
            "describe": {"burst": 100, "per_s": 20},
        }
        self.assertEqual(self.control("POST", "/config", {"throttle": "ec2"})["throttle"], ec2_limits)
        self.assertEqual(self.control("GET", "/config")["throttle"], ec2_limits)
        throttle = self.control("GET", "/throttle")
        self.assertEqual(throttle["config"], ec2_limits)
        self.assertEqual(throttle["tokens"], {"run_instances": 5, "mutating": 50, "describe": 100})
        error = self.control("POST", "/config", {"throttle": {"colour": {"burst": 1, "per_s": 1}}}, expect=400)["error"]
        self.assertIn("'throttle'", error)
        self.assertIn("'colour'", error)
        for bad in (
            "aws",
            5,
            {"describe": {"burst": 0.5, "per_s": 1}},
            {"describe": {"burst": 1, "per_s": 0}},
            {"describe": {"burst": 1}},
            {"describe": {"burst": 1, "per_s": 1, "jitter": 1}},
            {"describe": {"burst": True, "per_s": 1}},
            {"describe": 10},
        ):
            self.assertIn("'throttle'", self.control("POST", "/config", {"throttle": bad}, expect=400)["error"])
        self.assertEqual(self.control("GET", "/config")["throttle"], ec2_limits)

    def test_throttle_off(self) -> None:
        self.control("POST", "/config", {"throttle": {"describe": {"burst": 1, "per_s": 0.01}}})
        self.ec2.describe_regions()
        self.assert_error(self.ec2.describe_regions, "RequestLimitExceeded", 503)
        self.assertIsNone(self.control("POST", "/config", {"throttle": None})["throttle"])
        for _ in range(3):
            self.ec2.describe_regions()
        throttle = self.control("GET", "/throttle")
        self.assertEqual((throttle["config"], throttle["tokens"]), (None, {}))

    def test_control_errors(self) -> None:
        self.assertIn("bad JSON", self.control("POST", "/config", b"{nope", expect=400)["error"])
        self.assertIn("'boot_delay'", self.control("POST", "/config", {"boot_delay": 1}, expect=400)["error"])
        self.assertIn("'spot_mode'", self.control("POST", "/config", {"spot_mode": "maybe"}, expect=400)["error"])
        for key in ("status_mode", "address_mode"):
            self.assertIn(f"'{key}'", self.control("POST", "/config", {key: "maybe"}, expect=400)["error"])
        bad_fault = {"action": "X", "code": "Y", "colour": 1}
        self.assertIn("'colour'", self.control("POST", "/faults", bad_fault, expect=400)["error"])
        self.control("GET", "/nothing-here", expect=404)
        config = self.control("GET", "/config")
        expected_keys = {
            "boot_delay_s", "status_ok_delay_s", "terminate_delay_s", "console_lag_s", "console_mode",
            "ssh_start_delay_s", "ssh_refuse_s", "spot_mode", "spot_fulfill_delay_s", "placement_scores",
            "visibility_delay_s", "status_mode", "address_mode", "spot_prices", "on_demand_prices",
            "spot_cancel_race", "spot_reclaim_after_running_s", "spot_reclaim_notice_s", "throttle",
        }  # fmt: skip
        self.assertEqual(set(config), expected_keys)
        self.assertEqual(config["console_mode"], "ok")
        self.assertEqual((config["status_mode"], config["address_mode"]), ("ok", "public"))
        self.assertEqual((config["spot_cancel_race"], config["spot_reclaim_after_running_s"]), (False, None))
        for key, bad in (
            ("spot_prices", {"us-east-1a": 0}),
            ("on_demand_prices", {"t3.micro": "cheap"}),
            ("spot_cancel_race", 1),
            ("spot_reclaim_after_running_s", -1),
            ("spot_reclaim_notice_s", None),
        ):
            self.assertIn(f"'{key}'", self.control("POST", "/config", {key: bad}, expect=400)["error"])
        unknown_instance = {"instance_id": "i-0123456789abcdef0"}
        for body in ({"action": "explode"}, {"notice_s": -1}, {"colour": 1}, unknown_instance):
            self.control("POST", "/spot/interrupt", body, expect=400)
        self.control("POST", "/ssh", {"mode": "sometimes"}, expect=400)
        self.control("POST", "/ssh", {"mode": "open", "colour": 1}, expect=400)

    # Named to sort last: it ends the lab the other tests share.
    def test_zz_shutdown_on_stdin_eof(self) -> None:
        sshd_pid = int((self.state_dir / "sshd.pid").read_text())
        self.assertTrue(pid_alive(sshd_pid))
        self.proc.stdin.close()
        self.assertEqual(self.proc.wait(timeout=10), 0)
        self.assertTrue(wait_for(lambda: not pid_alive(sshd_pid)), "sshd outlived the lab")
        self.assertEqual(self.proc.stdout.read(), b"", "the lab wrote to stdout after its ready line")


class LabLifetimeTest(unittest.TestCase):
    """sshd must not outlive the lab, whichever way the lab ends."""

    def check_end(self, end) -> Path | None:
        """Ends a lab with `end`; the keys folder it kept on /dev/shm (None without one)."""
        with tempfile.TemporaryDirectory(prefix="acode-lab-life-") as tmp:
            state_dir = Path(tmp) / "state"
            proc, ready = start_lab(state_dir, "--boot-delay-s", "1.5", "--console-lag-s", "2")
            with urllib.request.urlopen(ready["control_url"] + "/config", timeout=10) as response:
                config = json.load(response)
            self.assertEqual((config["boot_delay_s"], config["console_lag_s"]), (1.5, 2.0))
            sshd_pid = int((state_dir / "sshd.pid").read_text())
            config_text = (state_dir / "sshd_config").read_text()
            keys_file = Path(re.search(r"^AuthorizedKeysFile (.+)$", config_text, re.M).group(1))
            if SHM_WRITABLE:
                self.assertEqual(keys_file.parent.parent, Path("/dev/shm"), "authorized_keys on tmpfs")
            end(proc)
            proc.wait(timeout=10)
            proc.stdin.close()
            proc.stdout.close()
            self.assertTrue(wait_for(lambda: not pid_alive(sshd_pid)), "sshd outlived the lab")
            return keys_file.parent if SHM_WRITABLE else None

    def test_sigterm(self) -> None:
        keys_dir = self.check_end(lambda proc: proc.send_signal(signal.SIGTERM))
        if keys_dir is not None:
            self.assertFalse(keys_dir.exists(), "the lab left its keys folder")

    def test_sigkill_reaches_sshd_through_pdeathsig(self) -> None:
        keys_dir = self.check_end(lambda proc: proc.kill())
        if keys_dir is None:
            return
        # A killed lab cannot clean up: the next lab to start removes its folder, and not one a live
        # lab holds (here this test process, maybe in another pid namespace as far as it can tell).
        self.assertTrue(keys_dir.exists())
        held = Path(tempfile.mkdtemp(prefix="acode-lab-keys-", dir="/dev/shm"))
        holder = os.open(held / "held-by-a-live-lab", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)
            with tempfile.TemporaryDirectory(prefix="acode-lab-life-") as tmp:
                proc, _ = start_lab(Path(tmp) / "state")
                try:
                    self.assertFalse(keys_dir.exists(), "a killed lab's keys folder outlived the next start")
                    self.assertTrue(held.exists(), "a live lab's keys folder was removed")
                finally:
                    proc.stdin.close()
                    proc.wait(timeout=10)
                    proc.stdout.close()
        finally:
            os.close(holder)
            shutil.rmtree(held, ignore_errors=True)


def differs(action: str, moto_answer: Any, lab_answer: Any) -> str:
    """Where two answers part, without their key material: a CreateKeyPair answer holds a private key,
    which test output must not show."""
    texts = [re.sub(r"<keyMaterial>.*?</keyMaterial>", "<keyMaterial>…</keyMaterial>", str(a), flags=re.S)
             for a in (moto_answer, lab_answer)]
    at = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
    near = slice(max(0, at - 60), at + 60)
    return f"{action}: the lab's answer parts from moto's at {at}: {texts[0][near]!r} / {texts[1][near]!r}"


class MotoSpeedupTest(unittest.TestCase):
    """The lab's short cuts through moto change no answer: each is run beside moto's own code."""

    @classmethod
    def setUpClass(cls) -> None:
        sys.path.insert(0, str(LAB.parent))
        import acode_lab  # noqa: E402  (sets moto's validation settings before moto is imported)

        cls.lab_module = acode_lab

    def test_joined_xml_writes_what_xmltodict_writes(self) -> None:
        import xmltodict

        lab = self.lab_module
        options = {"full_document": True, "pretty": False, "short_empty_elements": True}
        documents = [
            {"R": {"@xmlns": "http://ec2/", "a": "x & <y> 'z' \"q\"", "b": None, "c": [], "d": [1, True, False, None]}},
            {"R": {"@a": "it's \"quoted\"", "@b": None, "@c": 3, "#text": "t", "k": {"#text": ""}, "e": {}}},
            {"R": {"s": [{"i": "1"}, {"i": {"@x": "\n\t\r"}}], "n": 0, "f": 1.5}},
            {"R": {"#text": None, "x": {"#text": None, "@y": ""}}},
        ]
        for document in documents:
            self.assertEqual(lab._joined_xml(document), xmltodict.unparse(document, **options))
        # Left to xmltodict, which writes (or refuses) them as before.
        for unusual in (
            {"R": {"#comment": "c"}},
            {"R": {"b": b"bytes"}},
            {"R": {"t": ("a", "b")}},
            {"R": {"@xmlns": {"p": "u"}}},
            {"R": [{"a": "1"}, {"a": "2"}]},
            {"R": {}, "S": {}},
        ):
            with self.assertRaises(lab._UnusualXml):
                lab._joined_xml(unusual)
            try:
                expected = xmltodict.unparse(unusual, **options)
            except ValueError as refused:
                with self.assertRaises(type(refused)):
                    lab._JoinedXml.unparse(unusual, **options)
            else:
                self.assertEqual(lab._JoinedXml.unparse(unusual, **options), expected)
        for bad_name in ({"R": {"a b": "1"}}, {"R": {"@a=b": "1"}}):
            with self.assertRaises(ValueError):
                xmltodict.unparse(bad_name, **options)
            with self.assertRaises(ValueError):
                lab._joined_xml(bad_name)

    def test_every_answer_serializes_as_moto_writes_it(self) -> None:
        from moto import mock_aws
        from moto.core import responses, serialize

        original = (serialize.ResponseSerializer.get_value, serialize.xmltodict)
        lab_ways = (
            self.lab_module._remembered_get_value(original[0]),
            self.lab_module._JoinedXml(),
        )
        execute = responses.ActionResult.execute_result
        compared: list[str] = []

        def both(result: Any, context: Any) -> Any:
            answers = []
            for get_value, xml in (original, lab_ways, lab_ways):  # the second time from memory
                serialize.ResponseSerializer.get_value, serialize.xmltodict = get_value, xml
                answers.append(execute(result, context))
            serialize.ResponseSerializer.get_value, serialize.xmltodict = original
            for answer in answers[1:]:
                self.assertTrue(answer == answers[0], differs(context.operation_model.name, answers[0], answer))
            compared.append(context.operation_model.name)
            return answers[0]

        responses.ActionResult.execute_result = both
        try:
            with mock_aws():
                ec2 = boto3.client("ec2", region_name="us-east-1")
                image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
                ec2.create_key_pair(KeyName="k1", KeyType="ed25519")
                subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
                tags = [{"ResourceType": "instance", "Tags": [{"Key": "acode-session", "Value": "s1"}]}]
                launch = dict(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro", KeyName="k1")
                ids = [ec2.run_instances(**launch, SubnetId=subnet, TagSpecifications=tags)["Instances"][0]["InstanceId"]]
                ids += [ec2.run_instances(**launch, InstanceMarketOptions=SPOT_MARKET)["Instances"][0]["InstanceId"]]
                ec2.describe_instances(InstanceIds=ids)
                ec2.describe_instance_status(InstanceIds=ids, IncludeAllInstances=True)
                ec2.describe_key_pairs(KeyNames=["k1"])
                ec2.describe_security_groups()
                ec2.describe_spot_instance_requests()
                ec2.describe_volumes()
                ec2.terminate_instances(InstanceIds=ids)
                ec2.describe_instances(Filters=[{"Name": "tag:acode-session", "Values": ["s1"]}])
        finally:
            responses.ActionResult.execute_result = execute
        self.assertGreaterEqual(len(compared), 13, compared)

    def test_look_ups_by_key_answer_as_moto_does(self) -> None:
        from moto.ec2.exceptions import InvalidAMIIdError, InvalidKeyPairNameError, InvalidVolumeIdError
        from moto.ec2.models import EC2Backend, ec2_backends

        lab = self.lab_module
        backend = ec2_backends["123456789012"]["eu-west-3"]
        backend.create_key_pair("k1", "ed25519", tags={})
        volume = backend.create_volume(size=8, zone_name="eu-west-3a")
        image = next(iter(backend.amis))
        for mine, moto, known, error in (
            (lab._describe_key_pairs, EC2Backend.describe_key_pairs, "k1", InvalidKeyPairNameError),
            (lab._describe_volumes, EC2Backend.describe_volumes, volume.id, InvalidVolumeIdError),
            (lab._describe_images, EC2Backend.describe_images, image, InvalidAMIIdError),
        ):
            self.assertEqual(mine(backend, [known]), moto(backend, [known]))
            self.assertEqual(len(mine(backend, [known])), 1)
            unknown = "ami-00000000" if mine is lab._describe_images else "vol-00000000"
            with self.assertRaises(error):
                mine(backend, [unknown])
            with self.assertRaises(error):
                moto(backend, [unknown])


if __name__ == "__main__":
    unittest.main(verbosity=2)
