"""Runs PyPI's `gcp-storage-emulator` (in memory, one bucket) with the object-generation fields of
the real GCS API that orbax's tensorstore driver relies on.

  python tests/gcs_emulator.py --port 9023 --bucket my-bucket

The emulator stores a `generation` per object but (as of 2026.7) does not send it on media
downloads (real GCS sends `x-goog-generation`) and ignores generation preconditions. tensorstore
reads the header to stamp what it read and sends `ifGenerationNotMatch` / `ifGenerationMatch`
(conditional reads and writes of OCDBT manifests): without the header its reads fail with
"Malformed StorageGeneration". This launcher wraps the emulator's handlers, in this process only,
to send the header and to answer the preconditions as GCS does (304 for a download whose
generation matches `ifGenerationNotMatch`, 412 for a failed `ifGenerationMatch`, where `0` means
"the object must not exist"). Everything else is the emulator's own behaviour.
"""

from __future__ import annotations

import argparse
import logging
import sys
from http import HTTPStatus


def _current_generation(storage, bucket: str, name: str) -> str | None:
  from gcp_storage_emulator.exceptions import NotFound

  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _query(request, key: str) -> str | None:
  values = request.query.get(key)
  return values[0] if values else None


def _is_media(request) -> bool:
  return request.path.startswith("/download/") or _query(request, "alt") == "media"


def _with_generation(handler):
  """Object GETs: preconditions first, then the handler, then `x-goog-generation` on media."""

  def wrapped(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    gen = _current_generation(storage, bucket, name)
    match, not_match = _query(request, "ifGenerationMatch"), _query(request, "ifGenerationNotMatch")
    if gen is not None and match is not None and match != gen:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    if gen is not None and not_match is not None and not_match == gen:
      response.status = HTTPStatus.NOT_MODIFIED
      response["x-goog-generation"] = gen
      return None
    out = handler(request, response, storage, *args, **kwargs)
    if (
      gen is not None
      and _is_media(request)
      and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT)
    ):
      response["x-goog-generation"] = gen
      response["x-goog-metageneration"] = "1"
    return out

  return wrapped


def _with_upload_precondition(handler):
  """Media uploads (`?uploadType=media&name=...`, tensorstore's kind): `ifGenerationMatch`."""

  def wrapped(request, response, storage, *args, **kwargs):
    name, match = _query(request, "name"), _query(request, "ifGenerationMatch")
    if name is not None and match is not None:
      gen = _current_generation(storage, request.params["bucket_name"], name)
      if (match == "0" and gen is not None) or (match != "0" and match != gen):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return handler(request, response, storage, *args, **kwargs)

  return wrapped


def patch_handlers() -> None:
  """Swaps the wrapped object handlers into the emulator's routing table."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  wrap = {
    objects.get: _with_generation(objects.get),
    objects.download: _with_generation(objects.download),
    objects.insert: _with_upload_precondition(objects.insert),
  }
  server.HANDLERS = tuple(
    (regex, {m: wrap.get(f, f) for m, f in methods.items()}) for regex, methods in server.HANDLERS
  )


def _quiet_disconnects() -> None:
  """Clients (gcsfs, tensorstore) drop idle keep-alive connections the emulator still answers on;
  socketserver would print a BrokenPipeError traceback for each."""
  import socketserver

  report = socketserver.BaseServer.handle_error

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      report(self, request, client_address)

  socketserver.BaseServer.handle_error = handle_error


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--bucket", required=True, help="bucket created at start")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.CRITICAL)
  patch_handlers()
  _quiet_disconnects()
  from gcp_storage_emulator.server import create_server

  server = create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket)
  print(f"gcs emulator on http://{args.host}:{args.port} bucket {args.bucket}", flush=True)
  server.run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
