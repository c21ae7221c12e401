"""stores: URL normalisation, endpoint registration, fsspec access, error translation."""

from __future__ import annotations

import json
import os
import socket
import stat

import botocore.exceptions
import cloudfiles.interfaces
import cloudfiles.paths
import numpy as np
import pytest

from service.volume import stores
from service.volume.stores import (
    PermissionDenied,
    SourceNotFound,
    StoreUnreachable,
    VolumeError,
    normalize_url,
    object_exists,
    open_fs,
    register_s3_endpoint,
)


def closed_port() -> int:
    """A local port with nothing listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- URLs


def test_normalize_plain_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_url("layers/src") == f"file://{tmp_path}/layers/src"
    assert normalize_url(str(tmp_path / "a")) == f"file://{tmp_path}/a"
    assert normalize_url(tmp_path / "a") == f"file://{tmp_path}/a"
    assert normalize_url("file://layers/src/") == f"file://{tmp_path}/layers/src"
    assert normalize_url(f"precomputed://file://{tmp_path}/a/") == f"file://{tmp_path}/a"


def test_normalize_remote_urls():
    assert normalize_url("s3://bucket/layer/") == "s3://bucket/layer"
    assert normalize_url("gs://bucket/a/b") == "gs://bucket/a/b"
    assert normalize_url("precomputed://lab://bkt/x") == "lab://bkt/x"


@pytest.mark.parametrize("bad", ["", "   ", "s3://", "s3:///"])
def test_normalize_rejects_empty(bad):
    with pytest.raises(VolumeError) as e:
        normalize_url(bad)
    assert e.value.field == "url"
    assert "\n" not in str(e.value)


def test_volume_error_hierarchy_and_one_line_message():
    err = SourceNotFound("source", "no info\nfile \x1b[1;91mhere\x1b[m")
    assert isinstance(err, VolumeError) and isinstance(err, ValueError)
    assert err.field == "source"
    assert str(err) == "source: no info file here"
    assert issubclass(StoreUnreachable, VolumeError)
    from service.errors import EmrestoreError
    from service.errors import PermissionDenied as the_one
    assert PermissionDenied is the_one and issubclass(PermissionDenied, EmrestoreError)  # one class


# ---------------------------------------------------------------- fsspec


def test_open_fs_local_paths(tmp_path):
    fs, path = open_fs(str(tmp_path / "ledger" / "a.json"))
    assert path == str(tmp_path / "ledger" / "a.json")
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write("{}")
    fs2, path2 = open_fs(f"file://{tmp_path}/ledger/a.json")
    assert fs2.cat_file(path2) == b"{}"


def test_open_fs_memory():
    fs, path = open_fs("memory://emrestore-tests/x.txt")
    fs.pipe_file(path, b"hello")
    fs2, path2 = open_fs("memory://emrestore-tests/x.txt")
    assert fs2.cat_file(path2) == b"hello"


def test_open_fs_s3_without_network():
    import s3fs

    fs, path = open_fs("s3://some-bucket/jobs/ledger.json")
    assert isinstance(fs, s3fs.S3FileSystem)
    assert path == "some-bucket/jobs/ledger.json"


def test_open_fs_unknown_scheme():
    with pytest.raises(VolumeError) as e:
        open_fs("ftp://host/x")
    assert e.value.field == "url"
    assert "ftp://" in str(e.value) and "allowed" in str(e.value)


def test_open_fs_alias_reaches_moto(s3_endpoint):
    fs, path = open_fs(s3_endpoint.url("fsspec", "hello.txt"))
    assert path == f"{s3_endpoint.bucket}/fsspec/hello.txt"
    fs.pipe_file(path, b"written by fsspec")
    body = s3_endpoint.client().get_object(Bucket=s3_endpoint.bucket, Key="fsspec/hello.txt")["Body"].read()
    assert body == b"written by fsspec"
    assert object_exists(s3_endpoint.url("fsspec", "hello.txt"))
    assert not object_exists(s3_endpoint.url("fsspec", "missing.txt"))


def test_fsspec_and_cloudfiles_see_the_same_objects(s3_endpoint):
    from cloudfiles import CloudFiles

    CloudFiles(s3_endpoint.url("shared")).put("from-cloudfiles", b"abc", compress=None)
    fs, path = open_fs(s3_endpoint.url("shared", "from-cloudfiles"))
    assert fs.cat_file(path) == b"abc"


# ---------------------------------------------------------------- registration


def test_register_writes_secret_and_alias(s3_endpoint, tmp_path):
    secret = os.path.join(s3_endpoint.cloud_volume_dir, "secrets", "lab-secret.json")
    with open(secret) as f:
        data = json.load(f)
    assert data == {"AWS_ACCESS_KEY_ID": s3_endpoint.access_key_id, "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_access_key}
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert cloudfiles.paths.ALIASES["lab"] == f"s3://{s3_endpoint.endpoint_url}/"
    ep = stores.registered_endpoint("lab")
    assert ep.endpoint_url == s3_endpoint.endpoint_url


@pytest.mark.parametrize(
    "alias, url, field",
    [
        ("s3", "http://127.0.0.1:9", "alias"),
        ("file", "http://127.0.0.1:9", "alias"),
        ("precomputed", "http://127.0.0.1:9", "alias"),
        ("Bad-Alias", "http://127.0.0.1:9", "alias"),
        ("labok", "127.0.0.1:9", "endpoint_url"),
    ],
)
def test_register_rejects_bad_input(s3_endpoint, alias, url, field):
    with pytest.raises(VolumeError) as e:
        register_s3_endpoint(alias, url, "k", "s", cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    assert e.value.field == field


def test_reregistering_with_new_keys_resets_connection_pools(s3_endpoint):
    from cloudfiles import CloudFiles

    register_s3_endpoint("labrot", s3_endpoint.endpoint_url, s3_endpoint.access_key_id, s3_endpoint.secret_access_key,
                         cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    CloudFiles(f"labrot://{s3_endpoint.bucket}/rot").put("x", b"1", compress=None)
    assert len(cloudfiles.interfaces.S3_POOL) > 0
    register_s3_endpoint("labrot", s3_endpoint.endpoint_url, "AKIAROTATED", "new-secret",
                         cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    assert len(cloudfiles.interfaces.S3_POOL) == 0  # next connection reads the new secret file
    with open(os.path.join(s3_endpoint.cloud_volume_dir, "secrets", "labrot-secret.json")) as f:
        assert json.load(f)["AWS_ACCESS_KEY_ID"] == "AKIAROTATED"


# ---------------------------------------------------------------- failures


def test_moto_enforces_credentials(s3_endpoint):
    bad = s3_endpoint.client(aws_access_key_id="AKIANOTAKEY", aws_secret_access_key="wrong")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.list_objects_v2(Bucket=s3_endpoint.bucket)
    assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    wrong_secret = s3_endpoint.client(aws_secret_access_key="wrong")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong_secret.list_objects_v2(Bucket=s3_endpoint.bucket)
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket)


def test_bad_credentials_are_permission_denied(s3_endpoint):
    register_s3_endpoint("labbad", s3_endpoint.endpoint_url, "AKIANOTAKEY", "wrong", cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    with pytest.raises(PermissionDenied) as e:
        object_exists(f"labbad://{s3_endpoint.bucket}/anything/info", field="source")
    assert e.value.field == "source"
    assert "labbad://" in str(e.value)


def test_closed_port_is_unreachable(s3_endpoint):
    register_s3_endpoint("labdown", f"http://127.0.0.1:{closed_port()}", "k", "s", cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    with pytest.raises(StoreUnreachable) as e:
        object_exists("labdown://somebucket/layer/info", field="output")
    assert e.value.field == "output"
    fs, path = open_fs("labdown://somebucket/layer/info", fail_fast=True)
    with pytest.raises(Exception) as raw:
        fs.info(path)
    assert isinstance(stores.translate_store_error(raw.value, "labdown://somebucket/layer", "x"), StoreUnreachable)


def test_missing_bucket_counts_as_missing(s3_endpoint):
    assert not object_exists(f"lab://no-such-bucket-{np.random.randint(1 << 30)}/layer/info")


def test_translate_store_error_cases(tmp_path):
    denied = botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")
    assert isinstance(stores.translate_store_error(denied, "s3://b/k", "source"), PermissionDenied)
    missing = botocore.exceptions.ClientError({"Error": {"Code": "NoSuchKey", "Message": "no"}}, "GetObject")
    assert isinstance(stores.translate_store_error(missing, "s3://b/k", "source"), SourceNotFound)
    assert isinstance(stores.translate_store_error(ConnectionRefusedError(), "s3://b/k", "source"), StoreUnreachable)
    assert isinstance(stores.translate_store_error(PermissionError("ro"), "file:///x", "output"), PermissionDenied)
    assert stores.translate_store_error(KeyError("x"), "file:///x", "output") is None
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert isinstance(stores.translate_store_error(outer, "s3://b/k", "f"), StoreUnreachable)


def test_local_permission_denied(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "info").write_text("{}")
    locked.chmod(0)
    try:
        with pytest.raises(PermissionDenied):
            object_exists(f"file://{locked}/info")
    finally:
        locked.chmod(0o755)


def test_open_fs_http_without_network():
    from fsspec.implementations.http import HTTPFileSystem

    fs, path = open_fs("https://example.org/layer/info")
    assert isinstance(fs, HTTPFileSystem) and path == "https://example.org/layer/info"
