"""Uploading images to an S3-compatible bucket (`output.upload`), with bounded retries.

Configured the way RunPod's SDK is (`BUCKET_ENDPOINT_URL` with the bucket in the path,
`BUCKET_ACCESS_KEY_ID`, `BUCKET_SECRET_ACCESS_KEY`), read by `pipeline.settings` into a
`Bucket` that is passed in here: this module reads no environment. boto3 is used directly, not
`runpod.serverless.utils.rp_upload`: rp_upload names the keys itself (`<job id>/<uuid8>.<ext>`),
reads the environment on each call, writes the image to a local folder and returns that path
when no bucket is configured, and uses a month-year bucket unless told one, so a client could
get a success without any uploaded image. Here the key is `<job id>/<index>.<ext>`, the content
type is set, a failed upload is retried `UPLOAD_ATTEMPTS` times with backoff, then raised as
`UploadFailed` (the job fails), and the URL returned is a presigned GET valid for
`PRESIGNED_URL_SECONDS`, or `<BUCKET_PUBLIC_URL>/<key>` when that is configured.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import InvalidInput, UploadFailed
from pipeline.settings import Bucket

log = logging.getLogger(__name__)

PRESIGNED_URL_SECONDS = 7 * 24 * 3600  # 7 days: SigV4's longest presigned URL (as rp_upload)
UPLOAD_ATTEMPTS = 3  # tries per image
BACKOFF_SECONDS = 0.5  # waits 0.5 s, then 1 s between the tries
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 60
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def check_upload_configured(upload: bool, bucket: Bucket | None) -> None:
    """Refuse `output.upload` before any GPU work when the worker has no bucket."""
    if upload and bucket is None:
        raise InvalidInput("output.upload", "needs a bucket: set BUCKET_ENDPOINT_URL, "
                                            "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY "
                                            "on the endpoint, got none configured")


def object_key(job_id: str, index: int, extension: str) -> str:
    """`<job id>/<index>.<ext>`; characters a key should not carry become `_`."""
    safe = _KEY_UNSAFE.sub("_", str(job_id)).strip(".") or "job"
    return f"{safe}/{index}.{extension}"


class Uploader:
    """One boto3 S3 client on the configured bucket (path-style addressing, SigV4)."""

    def __init__(self, bucket: Bucket, sleep: Callable[[float], None] = time.sleep):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self._sleep = sleep
        # Our own loop below is the one retry policy: botocore's retries are off.
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                        retries={"total_max_attempts": 1},
                        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=bucket.endpoint_url, aws_access_key_id=bucket.access_key_id,
            aws_secret_access_key=bucket.secret_access_key, region_name=bucket.region,
            config=config)

    def put(self, data: bytes, key: str, content_type: str) -> str:
        """Upload `data` under `key`; return the URL a client fetches it from, or raise
        `UploadFailed` after `UPLOAD_ATTEMPTS` tries."""
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                self.client.put_object(Bucket=self.bucket.name, Key=key, Body=data,
                                       ContentType=content_type)
                break
            except (BotoCoreError, ClientError) as error:
                reason = f"{type(error).__name__}: {error}"
                log.warning("upload of %s to %s/%s, try %d of %d, failed: %s", key,
                            self.bucket.endpoint_url, self.bucket.name, attempt,
                            UPLOAD_ATTEMPTS, reason)
                if attempt == UPLOAD_ATTEMPTS:
                    raise UploadFailed(
                        f"`output.upload` failed: could not upload {key} to bucket "
                        f"{self.bucket.name!r} at {self.bucket.endpoint_url} after "
                        f"{UPLOAD_ATTEMPTS} tries ({reason})") from error
                self._sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
        if self.bucket.public_url:
            return f"{self.bucket.public_url}/{key}"
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket.name, "Key": key},
            ExpiresIn=PRESIGNED_URL_SECONDS)
