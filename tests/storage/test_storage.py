"""The storage module's retry rule on real botocore, s3fs and aiohttp errors, and on moto's S3 server behind a
proxy that answers some requests with an error of its own: what may pass is retried, what cannot ends at once."""

from __future__ import annotations

import logging
import time

import aiohttp
import botocore.exceptions as boto
import pytest
from conftest import S3_KEY, S3_SECRET
from s3fs.errors import translate_boto_error

from runner.errors import StorageError
from runner.storage.location import Location, _transient, describe, retrying, storage_errors


def client_error(status: int, code: str, message: str = "the store says no") -> boto.ClientError:
    return boto.ClientError({"Error": {"Code": code, "Message": message},
                             "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


ANSWERS = [  # (HTTP status, S3 error code, whether another try may pass)
    (503, "SlowDown", True),
    (503, "ServiceUnavailable", True),
    (500, "InternalError", True),
    (502, "BadGateway", True),
    (504, "GatewayTimeout", True),
    (429, "TooManyRequests", True),
    (400, "Throttling", True),
    (400, "RequestLimitExceeded", True),
    (400, "RequestTimeout", True),
    (403, "AccessDenied", False),
    (403, "InvalidAccessKeyId", False),
    (403, "SignatureDoesNotMatch", False),
    (400, "InvalidArgument", False),
    (400, "InvalidBucketName", False),
    (400, "InvalidStorageClass", False),
    (404, "NoSuchBucket", False),
    (301, "PermanentRedirect", False),
    (412, "PreconditionFailed", False),
    (501, "NotImplemented", False),
]


@pytest.mark.parametrize("status, code, transient", ANSWERS, ids=[f"{s}-{c}" for s, c, _ in ANSWERS])
def test_an_answer_from_the_store_is_retried_only_when_it_may_pass(status, code, transient):
    error = client_error(status, code)
    translated = translate_boto_error(error)  # what s3fs raises: an OSError with the ClientError as its cause
    assert isinstance(translated, OSError) and translated.__cause__ is error
    assert _transient(error) is transient
    assert _transient(translated) is transient


NOT_ANSWERS = [  # (an error raised before or instead of an answer, whether another try may pass)
    (boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
    (boto.ConnectTimeoutError(endpoint_url="http://10.255.255.1"), True),
    (boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
    (boto.ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), True),
    (aiohttp.ServerDisconnectedError(), True),
    (aiohttp.ClientPayloadError("Response payload is not completed"), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (ConnectionRefusedError(111, "Connection refused"), True),
    (TimeoutError("timed out"), True),
    (OSError(16, "Please reduce your request rate."), True),  # s3fs's SlowDown, where it drops the answer
    (boto.ParamValidationError(report='Invalid bucket name "Bad_Bucket!": Bucket name must match'), False),
    (boto.NoCredentialsError(), False),
    (boto.EndpointResolutionError(msg="Custom endpoint `http://h:port` was not a valid URI"), False),
    (boto.SSLError(endpoint_url="https://127.0.0.1:9", error="CERTIFICATE_VERIFY_FAILED"), False),
    (ValueError("Invalid endpoint: http//bad"), False),
    (FileNotFoundError(2, "No such file or directory"), False),
    (PermissionError(13, "Permission denied"), False),
    (NotADirectoryError(20, "Not a directory"), False),
    (StorageError("output.path: s3://b/out: Access Denied"), False),
]


@pytest.mark.parametrize("error, transient", NOT_ANSWERS, ids=[type(e).__name__ + str(i) for i, (e, _) in
                                                               enumerate(NOT_ANSWERS)])
def test_errors_without_an_answer_are_retried_only_when_the_network_or_a_clock_is_to_blame(error, transient):
    assert _transient(error) is transient


def test_a_permanent_error_ends_at_once_and_a_transient_one_is_tried_again():
    calls = []

    @retrying
    def denied():
        calls.append(1)
        raise translate_boto_error(client_error(403, "AccessDenied", "Access Denied"))

    started = time.time()
    with pytest.raises(PermissionError):
        denied()
    assert len(calls) == 1 and time.time() - started < 0.5
    answers = [translate_boto_error(client_error(503, "SlowDown")), boto.EndpointConnectionError(endpoint_url="x")]

    @retrying
    def flaky():
        if answers:
            raise answers.pop(0)
        return "written"

    assert flaky() == "written" and not answers


def test_an_error_is_described_on_one_line_with_the_stores_answer():
    multi = boto.ParamValidationError(report='Invalid bucket name "Bad_Bucket!": Bucket name must match the regex')
    assert describe(multi) == ('Parameter validation failed: Invalid bucket name "Bad_Bucket!": Bucket name must '
                               'match the regex')
    denied = translate_boto_error(client_error(403, "AccessDenied", "Access Denied"))
    assert describe(denied) == "Access Denied (HTTP 403 AccessDenied)"
    assert len(describe(ValueError("x" * 1000))) == 200
    with pytest.raises(StorageError, match=r"^output\.path: s3://b/out: Access Denied \(HTTP 403 AccessDenied\)$"):
        with storage_errors("output.path: s3://b/out"):
            raise denied


def s3_location(bucket: str, endpoint: str) -> Location:
    return Location.open(f"s3://{bucket}/out", {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint,
                                                "skip_instance_cache": True})


def refuse_puts(status: int, code: str, times: int = 1_000_000):
    """A proxy rule: the first `times` PUTs get (status, code)."""
    left = [times]

    def refuse(method, headers):
        if method == "PUT" and left[0] > 0:
            left[0] -= 1
            return status, code
        return None

    return refuse


def test_through_moto_a_denied_write_is_asked_once_and_a_throttled_one_until_it_passes(s3_bucket, s3_proxy):
    bucket, _ = s3_bucket
    denied = s3_proxy(refuse_puts(403, "AccessDenied"))
    refusing = s3_location(bucket, denied.url)
    assert not refusing.exists("x")  # the client is up: what is timed below is the refused write alone
    started = time.time()
    with pytest.raises(PermissionError):
        refusing.write_bytes("x", b"1")
    assert denied.refused == 1 and time.time() - started < 1.0
    throttled = s3_proxy(refuse_puts(503, "SlowDown", times=2))
    loc = s3_location(bucket, throttled.url)
    loc.write_bytes("x", b"1")
    assert throttled.refused == 2 and loc.read_bytes("x") == b"1"


def refuse_conditional(method, headers):
    """A store without conditional writes that says so: 501 to a PUT or DELETE with If-None-Match or If-Match."""
    if method in ("PUT", "DELETE") and ("If-None-Match" in headers or "If-Match" in headers):
        return 501, "NotImplemented"
    return None


def test_a_store_refusing_conditional_writes_gets_plain_ones_said_once(s3_server, s3_bucket, s3_proxy, caplog):
    bucket, _ = s3_bucket
    proxy = s3_proxy(refuse_conditional)
    loc = s3_location(bucket, proxy.url)
    assert loc.create("x.json", b"one")  # refused as a conditional write, then made as a plain one
    assert not loc.create("x.json", b"two")  # the plain check finds it
    _, version = loc.read_versioned("x.json")
    assert loc.replace_if("x.json", b"three", version) and loc.read_bytes("x.json") == b"three"
    assert loc.remove_if("x.json", version) and not loc.exists("x.json")
    assert proxy.refused == 1  # asked conditionally once; plain writes from then on
    said = [r for r in caplog.records if "conditional writes" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [(logging.WARNING, (
        f"s3://{bucket}/out: the store refuses conditional writes (HTTP 501 NotImplemented to a put_object with "
        "If-None-Match); using plain writes instead, which the job lock checks by reading back"))]
    assert not loc.exclusive_writes
    direct = s3_location(bucket, s3_server)  # a location on the store itself keeps its conditional writes
    assert direct.create("y.json", b"1") and not direct.create("y.json", b"2")
    assert type(direct.writes).__name__ == "_S3Writes"
