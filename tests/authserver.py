"""moto's S3 server in its own process with authentication enforced (tests only).

moto checks signatures and IAM policies once its first INITIAL_NO_AUTH_ACTION_COUNT requests are
spent; the fixture spends exactly those on set-up: a bucket, and IAM users whose keys can write,
can only read, or may do nothing. Any other key is unknown to it (InvalidAccessKeyId).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SETUP_ACTIONS = 8  # create_bucket + 3 × create_user + 3 × create_access_key + 1 put_user_policy (writer)
READ_ONLY_ACTIONS = 1  # + put_user_policy (reader)


@dataclass(frozen=True)
class AuthS3:
    endpoint: str
    bucket: str
    writer: dict[str, str]  # may read and write the bucket
    reader: dict[str, str]  # may only read
    nobody: dict[str, str]  # a valid key without any permission


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _policy(actions: list[str]) -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})


@contextmanager
def auth_s3_server(bucket: str = "auth-bucket"):
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS + READ_ONLY_ACTIONS)}
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        anon = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                "aws_secret_access_key": "setup"}
        boto3.client("s3", **anon).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **anon)
        keys = {}
        for user in ("writer", "reader", "nobody"):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        iam.put_user_policy(UserName="writer", PolicyName="rw", PolicyDocument=_policy(["s3:*"]))
        iam.put_user_policy(UserName="reader", PolicyName="ro",
                            PolicyDocument=_policy(["s3:GetObject", "s3:ListBucket", "s3:HeadBucket"]))
        yield AuthS3(endpoint, bucket, keys["writer"], keys["reader"], keys["nobody"])
    finally:
        proc.kill()
        proc.wait()
