#!/usr/bin/env python3
"""Self-check of the acode EC2 lab: python tests/lab/test_lab.py (with the lab venv's python).

Starts acode_lab.py as a subprocess, drives it with boto3 and ssh, and checks
every behaviour the lab adds to moto. Runs in well under a minute.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import select
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
            },
        )

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
        return subprocess.run(
            [
                "ssh", "-F", "/dev/null", "-i", str(key_path), "-p", str(self.ready["sshd_port"]),
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
                f"{self.ready['ssh_user']}@127.0.0.1", "true",
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
        self.assertEqual(self.imds("GET", action_path, {"X-aws-ec2-metadata-token": token})[0], 404)
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
            "visibility_delay_s", "status_mode", "address_mode",
        }  # fmt: skip
        self.assertEqual(set(config), expected_keys)
        self.assertEqual(config["console_mode"], "ok")
        self.assertEqual((config["status_mode"], config["address_mode"]), ("ok", "public"))

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

    def check_end(self, end) -> None:
        with tempfile.TemporaryDirectory(prefix="acode-lab-life-") as tmp:
            state_dir = Path(tmp) / "state"
            proc, ready = start_lab(state_dir, "--boot-delay-s", "1.5", "--console-lag-s", "2")
            with urllib.request.urlopen(ready["control_url"] + "/config", timeout=10) as response:
                config = json.load(response)
            self.assertEqual((config["boot_delay_s"], config["console_lag_s"]), (1.5, 2.0))
            sshd_pid = int((state_dir / "sshd.pid").read_text())
            end(proc)
            proc.wait(timeout=10)
            proc.stdin.close()
            proc.stdout.close()
            self.assertTrue(wait_for(lambda: not pid_alive(sshd_pid)), "sshd outlived the lab")

    def test_sigterm(self) -> None:
        self.check_end(lambda proc: proc.send_signal(signal.SIGTERM))

    def test_sigkill_reaches_sshd_through_pdeathsig(self) -> None:
        self.check_end(lambda proc: proc.kill())


if __name__ == "__main__":
    unittest.main(verbosity=2)
