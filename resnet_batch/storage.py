"""storage module: filesystems for input/output URLs, S3 options, error explanations, and the preflight run before
any work (listing the input is embed/listing.py's; writing into an output, output/store.py's).

Credentials are never copied anywhere by this module: each process (driver, Ray workers) resolves them
through botocore's usual chain (storage_options key/secret/token/profile, then AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE + ~/.aws files, instance roles). Only routing
information (endpoint, region) found in the driver's environment is written into the options, so that
workers on other machines talk to the same store.
"""
from __future__ import annotations

import inspect
import os
import posixpath
from pathlib import Path
from typing import Optional

import fsspec
from fsspec.core import split_protocol, url_to_fs

from resnet_batch.redact import redact_text
from resnet_batch.text import printable

S3_PROTOCOLS = ("s3", "s3a")
# s3fs options that are not parameters of S3FileSystem.__init__ but are accepted through **kwargs.
_S3_EXTRA_OPTIONS = {"profile", "session_vars", "use_listings_cache", "listings_expiry_time", "max_paths",
                     "skip_instance_cache"}
_S3_ALIASES = {"region": "client_kwargs.region_name"}
# Preflight must fail fast on an unreachable endpoint: botocore's default is 60 s connect timeout x 5 tries.
_PREFLIGHT_CONFIG = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2, "mode": "standard"}}
WRITE_CHECK_NAME = "_write_check"


class StorageOptionsError(ValueError):
    """storage_options that the filesystem would reject or silently misread."""


class StorageAccessError(OSError):
    """The store cannot be used as configured; the message says what to fix, secrets masked (see `explain`)."""

    def __init__(self, message: str):
        super().__init__(_secret_free(message))


def is_s3(uri: str) -> bool:
    return (split_protocol(uri)[0] or "file") in S3_PROTOCOLS


def s3_option_names() -> set[str]:
    """Every storage option key s3fs understands for s3:// URLs (plus our `region` alias)."""
    import s3fs

    params = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters) - {"self", "kwargs"}
    return params | _S3_EXTRA_OPTIONS | set(_S3_ALIASES)


def resolve_options(uri: str, options: dict, *, env: Optional[dict] = None, where: str = "storage_options") -> dict:
    """The storage options to use for `uri` on the driver and every worker.

    For s3://: unknown keys are refused with the key named (s3fs would pass them on to botocore and fail
    later with a TypeError); `region` is an alias of client_kwargs.region_name; the endpoint and region
    come from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_REGION / AWS_DEFAULT_REGION when not set.
    Other protocols get their options unchanged. Idempotent.
    """
    if not is_s3(uri):
        return dict(options)
    env = os.environ if env is None else env
    unknown = sorted(set(options) - s3_option_names())
    if unknown:
        raise StorageOptionsError(
            f"{where}: unknown option(s) {unknown} for {uri}; s3 options are e.g. endpoint_url, region, anon, "
            "key, secret, token, profile, client_kwargs, config_kwargs")
    opts = dict(options)
    client = dict(opts.get("client_kwargs") or {})
    if "region" in opts:
        region = opts.pop("region")
        if client.get("region_name", region) != region:
            raise StorageOptionsError(f"{where}: region {region!r} and client_kwargs.region_name "
                                      f"{client['region_name']!r} disagree")
        client["region_name"] = region
    if not opts.get("endpoint_url") and not client.get("endpoint_url"):
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    if not client.get("region_name"):
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    return opts


def filesystem(uri: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less root path (no trailing slash) for a URI."""
    fs, root = url_to_fs(uri, **resolve_options(uri, options))
    return fs, root.rstrip("/") or "/"


def protocols(fs) -> tuple[str, ...]:
    """A filesystem's protocol names (fsspec gives a string or a tuple); the first is the main one."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def display_path(protocol: str, path: str) -> str:
    """A path as the user wrote it: plain for local files, protocol://... otherwise."""
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_folder(fs, root: str) -> list[str]:
    """The paths directly in a folder; none when it does not exist (yet)."""
    try:
        return fs.ls(root, detail=False)
    except FileNotFoundError:
        return []


def endpoint_of(fs) -> str:
    """Where an s3fs filesystem sends its requests (for messages)."""
    try:
        return fs.s3.meta.endpoint_url
    except Exception:
        return fs.endpoint_url or "the default AWS endpoint"


# -- explaining errors ----------------------------------------------------------------------------
def explain(err: BaseException, uri: str, side: str, endpoint: str = "") -> str:
    """A one-line explanation of a storage error, naming what to fix; no secret from the URI, the endpoint or the
    store's own message (`user:pass@`, a token in a query, an Authorization header) survives in it."""
    return _secret_free(_explanation(err, uri, side, endpoint))


def _secret_free(message: str) -> str:
    return printable(redact_text(message))


def _explanation(err: BaseException, uri: str, side: str, endpoint: str) -> str:
    where = f" at {endpoint}" if endpoint else ""
    opts = f"{side}.storage_options"
    code, message = _error_code(err)
    name = type(err).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or \
            isinstance(err, (ConnectionError, TimeoutError)) and not code:
        return (f"{side} {uri}: cannot reach the S3 endpoint {endpoint or '(default)'} ({message}); "
                f"check {opts}.endpoint_url or AWS_ENDPOINT_URL")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"{side} {uri}: no S3 credentials found ({message}); set {opts}.key/secret, "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or {opts}.anon: true for a public bucket")
    if code == "SignatureDoesNotMatch":
        return (f"{side} {uri}: the secret key was rejected{where} (SignatureDoesNotMatch); check {opts}.secret, "
                "AWS_SECRET_ACCESS_KEY or the AWS profile")
    if code in ("InvalidAccessKeyId", "InvalidClientTokenId", "InvalidToken", "ExpiredToken"):
        return (f"{side} {uri}: the access key is not valid{where} ({code}); check {opts}.key, "
                "AWS_ACCESS_KEY_ID / AWS_SESSION_TOKEN or the AWS profile")
    if code == "NoSuchBucket":
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        return f"{side} {uri}: bucket '{bucket}' does not exist{where}"
    if code in ("AccessDenied", "AllAccessDisabled", "Forbidden", "403") or isinstance(err, PermissionError):
        return f"{side} {uri}: access denied{where} ({code or name}: {message})"
    if isinstance(err, FileNotFoundError):
        return f"{side} not found: {uri} ({side}.uri)"
    return f"{side} {uri}: {code or name}: {message}"


def _error_code(err: BaseException) -> tuple[str, str]:
    """(S3 error code, message) from a botocore ClientError, or one that s3fs translated (kept as __cause__)."""
    for e in (err, err.__cause__, err.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            error = response["Error"]
            return str(error.get("Code", "")), str(error.get("Message", "") or e)
    return "", str(err)


# -- preflight ------------------------------------------------------------------------------------
def _preflight_fs(uri: str, options: dict):
    """An s3fs filesystem with short timeouts and retries (not the shared instance the job uses)."""
    import s3fs

    opts = resolve_options(uri, options)
    config = {**_PREFLIGHT_CONFIG, **(opts.get("config_kwargs") or {})}
    opts = {k: v for k, v in opts.items() if k not in ("config_kwargs", "skip_instance_cache")}
    return s3fs.S3FileSystem(**opts, config_kwargs=config, skip_instance_cache=True)


def check_readable(uri: str, options: dict) -> None:
    """Raise StorageAccessError unless the input can be listed and holds something (one small request)."""
    if not is_s3(uri):
        fs, root = filesystem(uri, options)
        try:
            found = fs.exists(root)
        except Exception as err:
            raise StorageAccessError(explain(err, uri, "input")) from None
        if not found:
            raise StorageAccessError(f"input not found: {uri} (input.uri)")
        return
    fs = _preflight_fs(uri, options)
    bucket, key, _ = fs.split_path(uri)
    endpoint = endpoint_of(fs)
    try:
        out = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1, **fs.req_kw)
    except Exception as err:
        raise StorageAccessError(explain(err, uri, "input", endpoint)) from None
    if not out.get("KeyCount", len(out.get("Contents", ()))) and not out.get("CommonPrefixes"):
        raise StorageAccessError(f"input not found: {uri} (input.uri): no objects under this prefix at {endpoint}")


def check_writable(uri: str, options: dict) -> None:
    """Raise StorageAccessError unless the output location can be listed and accepts a write (and a delete)
    of an empty object."""
    if not is_s3(uri):
        fs, root = filesystem(uri, options)
        if "file" not in protocols(fs):
            return  # other remote stores: the first write reports its own error
        if os.path.isfile(root):
            raise StorageAccessError(f"output {uri}: is a file, not a folder (output.uri)")
        parent = root
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise StorageAccessError(f"output {uri}: {parent} is a file, not a folder (output.uri)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StorageAccessError(f"output {uri}: {parent} is not writable (output.uri)")
        return
    fs = _preflight_fs(uri, options)
    bucket, key, _ = fs.split_path(uri)
    endpoint = endpoint_of(fs)
    probe = posixpath.join(key, f"{WRITE_CHECK_NAME}.{os.getpid()}")  # key "" -> the bucket's root
    try:
        # List first: the job lists its output to resume, and some stores (SeaweedFS for an admin key)
        # would create a missing bucket on a PUT instead of saying it does not exist.
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1, **fs.req_kw)
        fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"", **fs.req_kw)
    except Exception as err:
        raise StorageAccessError(explain(err, uri, "output", endpoint)) from None
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=probe, **fs.req_kw)
    except Exception as err:
        raise StorageAccessError(f"output {uri}: objects can be written but not deleted at {endpoint} "
                                 f"({explain(err, uri, 'output', endpoint)}); the job needs s3:DeleteObject") from None


def prepare(cfg):
    """Resolve both sides' storage options and check them before any work: returns the config to run with.

    Raises InputError / OutputError (the CLI's exit code 2) with a message that says what to fix.
    """
    from resnet_batch.errors import InputError, OutputError

    try:
        inp = resolve_options(cfg.input.uri, dict(cfg.input.storage_options), where="input.storage_options")
    except StorageOptionsError as err:
        raise InputError(str(err)) from None
    try:
        out = resolve_options(cfg.output.uri, dict(cfg.output.storage_options), where="output.storage_options")
    except StorageOptionsError as err:
        raise OutputError(str(err)) from None
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"storage_options": inp}),
                                 "output": cfg.output.model_copy(update={"storage_options": out})})
    try:
        check_readable(cfg.input.uri, inp)
    except StorageAccessError as err:
        raise InputError(str(err)) from None
    try:
        check_writable(cfg.output.uri, out)
    except StorageAccessError as err:
        raise OutputError(str(err)) from None
    return cfg


CACHE_ENV = "RESNET_BATCH_CACHE"


def cache_dir() -> Path:
    """This node's cache (converted weights, copies of remote indexes): $RESNET_BATCH_CACHE, else
    $XDG_CACHE_HOME/resnet-batch, else ~/.cache/resnet-batch."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet-batch"
