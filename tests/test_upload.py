"""`output.upload` against a real S3-compatible server on loopback (moto's server mode): the bucket
settings, the uploader, and the RunPod local server putting images in the bucket."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import boto3
import pytest
import requests

from pipeline.errors import SettingsError, UploadFailed
from pipeline.settings import Bucket, Settings
from pipeline.upload import PRESIGNED_URL_SECONDS, UPLOAD_ATTEMPTS, Uploader, object_key
from scripts.local_servers import RunPodServer, free_port

ROOT = Path(__file__).resolve().parent.parent
FAST = {"width": 512, "height": 512, "steps": 2}
BUCKET = "my-bucket"
KEYS = {"BUCKET_ACCESS_KEY_ID": "test-key-id", "BUCKET_SECRET_ACCESS_KEY": "test-secret-value"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with the bucket created; yields `http://127.0.0.1:<port>`."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    _client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _client(endpoint: str):
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=KEYS["BUCKET_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["BUCKET_SECRET_ACCESS_KEY"])


def _bucket(endpoint: str, **extra: str) -> Bucket:
    bucket = Settings.from_env({"BUCKET_ENDPOINT_URL": f"{endpoint}/{BUCKET}", **KEYS,
                                **extra}).bucket
    assert bucket is not None
    return bucket


# ------------------------------------------------------------------------------ settings


def test_the_bucket_settings_are_read_as_runpods_sdk_names_them():
    assert Settings.from_env({}).bucket is None
    bucket = _bucket("https://s3.eu-west-1.amazonaws.com")
    assert (bucket.endpoint_url, bucket.name, bucket.region) == (
        "https://s3.eu-west-1.amazonaws.com", BUCKET, "us-east-1")
    assert _bucket("https://x.s3.eu-west-1.amazonaws.com").region == "eu-west-1"
    assert _bucket("http://127.0.0.1:9", BUCKET_PUBLIC_URL="https://cdn.example/i/").public_url \
        == "https://cdn.example/i"


def test_the_secret_is_never_reported():
    settings = Settings.from_env({"BUCKET_ENDPOINT_URL": f"http://127.0.0.1:9/{BUCKET}", **KEYS})
    report = settings.report()
    assert "test-secret-value" not in str(report) and "test-secret-value" not in repr(settings)
    assert "test-key-id" not in report["bucket"] and "****id" in report["bucket"]
    assert "<redacted>" in report["bucket"] and BUCKET in report["bucket"]


@pytest.mark.parametrize(("env", "needle"), [
    ({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9/b"}, "`BUCKET_ACCESS_KEY_ID` must be set"),
    ({**KEYS}, "`BUCKET_ENDPOINT_URL` must be set"),
    ({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", **KEYS}, "bucket in the path"),
    ({"BUCKET_ENDPOINT_URL": "ftp://h/b", **KEYS}, "`BUCKET_ENDPOINT_URL` must be http"),
    ({"BUCKET_ENDPOINT_URL": "http://h/b", "BUCKET_PUBLIC_URL": "cdn", **KEYS},
     "`BUCKET_PUBLIC_URL`"),
])
def test_a_bad_bucket_setting_is_refused_naming_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


# ------------------------------------------------------------------------------ uploader


def test_object_keys_are_job_id_and_index():
    assert object_key("c80ffee4-u1", 0, "png") == "c80ffee4-u1/0.png"
    assert object_key("../a b", 3, "jpg") == "_a_b/3.jpg"


def test_an_upload_lands_in_the_bucket_and_its_url_fetches_it(s3_endpoint):
    data = b"\x89PNG fake bytes"
    url = Uploader(_bucket(s3_endpoint)).put(data, "job-1/0.png", "image/png")
    stored = _client(s3_endpoint).get_object(Bucket=BUCKET, Key="job-1/0.png")
    assert stored["Body"].read() == data and stored["ContentType"] == "image/png"
    assert url.startswith(f"{s3_endpoint}/{BUCKET}/job-1/0.png?")
    assert f"X-Amz-Expires={PRESIGNED_URL_SECONDS}" in url and "test-secret-value" not in url
    fetched = requests.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.content == data


def test_a_public_url_is_returned_when_configured(s3_endpoint):
    bucket = _bucket(s3_endpoint, BUCKET_PUBLIC_URL=f"{s3_endpoint}/{BUCKET}")
    url = Uploader(bucket).put(b"x", "job-2/0.webp", "image/webp")
    assert url == f"{s3_endpoint}/{BUCKET}/job-2/0.webp"


def test_an_unreachable_bucket_fails_clearly_after_the_retries():
    waits: list[float] = []
    uploader = Uploader(_bucket(f"http://127.0.0.1:{free_port()}"), sleep=waits.append)
    with pytest.raises(UploadFailed, match=f"after {UPLOAD_ATTEMPTS} tries") as caught:
        uploader.put(b"x", "job-3/0.png", "image/png")
    assert "`output.upload` failed" in str(caught.value) and "job-3/0.png" in str(caught.value)
    assert waits == [0.5, 1.0]  # backoff between the tries, none after the last


# ------------------------------------------------------------------------ the handler


def test_upload_without_a_bucket_is_refused_before_generation(worker, predictor):
    assert predictor.settings.bucket is None
    calls = [0]
    hook = predictor.service.text_pipe.unet.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        answer = worker({"id": "u1", "input": {"prompt": "x", **FAST,
                                               "output": {"upload": True}}})
    finally:
        hook.remove()
    assert set(answer) == {"error"} and "`output.upload`" in answer["error"]
    assert "BUCKET_ENDPOINT_URL" in answer["error"] and calls[0] == 0


def test_an_unreachable_bucket_fails_the_job_and_the_worker_keeps_serving(
        worker, predictor, monkeypatch):
    monkeypatch.setattr(predictor, "settings", dataclasses.replace(
        predictor.settings, bucket=_bucket(f"http://127.0.0.1:{free_port()}")))
    answer = worker({"id": "u2", "input": {"prompt": "x", **FAST, "output": {"upload": True}}})
    assert set(answer) == {"error"} and f"after {UPLOAD_ATTEMPTS} tries" in answer["error"]
    assert "output.upload" in answer["error"]
    done = worker({"id": "u3", "input": {"prompt": "x", **FAST}})
    assert done["status"] == "success" and done["image_base64"]


# ------------------------------------------------------------- the RunPod local server


@pytest.fixture(scope="module")
def runpod_server(tiny_weights, tmp_path_factory, s3_endpoint):
    workdir = tmp_path_factory.mktemp("runpod-upload")
    server = RunPodServer(ROOT, tiny_weights, workdir, VOLUME_ROOT=str(workdir / "volume"),
                          BUCKET_ENDPOINT_URL=f"{s3_endpoint}/{BUCKET}", **KEYS)
    server.start()
    yield server
    server.stop()


def test_the_local_worker_uploads_each_image(runpod_server, s3_endpoint):
    job = runpod_server.runsync({"input": {"prompt": "a knight", "seed": 5, **FAST,
                                           "num_outputs": 2, "output": {
                                               "upload": True, "include_base64": False}}})
    assert job["status"] == "COMPLETED", job
    output, client = job["output"], _client(s3_endpoint)
    assert [entry["seed"] for entry in output["images"]] == [5, 6]
    for index, entry in enumerate(output["images"]):
        assert "image_base64" not in entry
        stored = client.get_object(Bucket=BUCKET, Key=f"{job['id']}/{index}.png")
        data = stored["Body"].read()
        assert data.startswith(b"\x89PNG") and len(data) == entry["bytes"]
        assert stored["ContentType"] == "image/png"
        fetched = requests.get(entry["image_url"], timeout=10)
        assert fetched.status_code == 200 and fetched.content == data
    assert "test-secret-value" not in runpod_server.log()


def test_the_local_worker_uploads_one_image_with_todays_keys(runpod_server, s3_endpoint):
    job = runpod_server.runsync({"input": {"prompt": "a bard", "seed": 9, **FAST, "output": {
        "upload": True, "format": "jpeg"}}})
    output = job["output"]
    assert output["status"] == "success" and "images" not in output
    assert output["seed"] == 9 and output["image_base64"]  # include_base64 stays on
    stored = _client(s3_endpoint).get_object(Bucket=BUCKET, Key=f"{job['id']}/0.jpg")
    assert stored["ContentType"] == "image/jpeg"
    assert requests.get(output["image_url"], timeout=10).content == stored["Body"].read()
