"""The tests' S3 bucket on moto's server (the ``s3_env`` fixture in conftest.py): a client and a listing."""

from __future__ import annotations

BUCKET = "stkd-test"


def client(variables: dict[str, str]):
    """A boto3 S3 client for the server that ``variables`` (the AWS variables of ``s3_env``) point at."""
    import boto3

    return boto3.client("s3", endpoint_url=variables["AWS_ENDPOINT_URL"], region_name=variables["AWS_DEFAULT_REGION"],
                        aws_access_key_id=variables["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=variables["AWS_SECRET_ACCESS_KEY"])


def keys(variables: dict[str, str], prefix: str) -> list[str]:
    """Every key under ``prefix`` in the tests' bucket."""
    pages = client(variables).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
