#!/usr/bin/env python3
"""Drives a running maas with NVIDIA's real Triton client (`tritonclient`) over the Open
Inference Protocol (KServe v2): HTTP/REST under /v2 and gRPC `inference.GRPCInferenceService`,
both on the one address given by --url. Results are compared with maas's own JSON API
(/v1/pipelines/NAME/infer) on the same server.

Run by tests/v2_clients.rs with .venv-clients/bin/python (made by scripts/client-env):

    .venv-clients/bin/python tests/clients/v2_check.py --url 127.0.0.1:PORT --checks main
    .venv-clients/bin/python tests/clients/v2_check.py --url 127.0.0.1:PORT --checks failed --model p

Groups (--checks, comma-separated):
  main    a server started in the repository root (pipelines `classify` and `embed`): health,
          metadata, inference in every encoding against the JSON API, and the error statuses.
  failed  a server one of whose submodels has failed: live, but neither the server nor the
          pipeline given by --model is ready.

Prints one line per check passed and finally `v2_check: N checks passed`; on the first failure
prints what failed (with the traceback) to stderr and exits 1. (It never prints a line of the
form `N passed, N failed`: scripts/test reads that form from cargo's output.)
"""

import argparse
import http.client
import json
import os
import sys
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]

# Response parameters naming each submodel's version (the JSON API's `model_versions`): one
# string parameter per submodel, named PREFIX + submodel name.
VERSION_PARAM_PREFIX = ""

# Largest difference allowed between the v2 outputs and the JSON API's.
TOLERANCE = 1e-6

# How long one call may take (seconds).
TIMEOUT = 60.0

TEXTS = ["A man is eating food.", "Ünïcödé text ✓"]


class Checker:
    """Runs checks in order; stops the script at the first failure."""

    def __init__(self):
        self.passed = 0

    def check(self, name, fn):
        """Runs `fn`; its result, or the script ends here when it raises."""
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way
            traceback.print_exc()
            what = f"{type(e).__name__}: {e}" if not isinstance(e, AssertionError) else str(e)
            print(f"v2_check: FAILED {name}: {what}", file=sys.stderr)
            sys.exit(1)
        self.passed += 1
        print(f"ok {name}", flush=True)
        return result


def expect(cond, message):
    """Like `assert`, but not removed by `python -O`."""
    if not cond:
        raise AssertionError(message)


def json_api(url, pipeline, inputs):
    """maas's own JSON API: `POST /v1/pipelines/NAME/infer` -> the parsed answer."""
    body = json.dumps({"inputs": inputs}).encode()
    req = urllib.request.Request(
        f"http://{url}/v1/pipelines/{pipeline}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"JSON API {pipeline}: HTTP {e.code}: {e.read()[:500]!r}") from None


def http_status_error(fn, status, what):
    """Calls `fn`, which must raise InferenceServerException with HTTP `status`; its message."""
    try:
        fn()
    except InferenceServerException as e:
        expect(e.status() == status, f"{what}: status {e.status()!r}, want {status!r} ({e.message()!r})")
        # tritonclient sets debug_details only when the error body is not `{"error": "..."}`.
        expect(
            e.debug_details() is None,
            f"{what}: the error body is not a JSON object with a string `error`: {e.debug_details()!r}",
        )
        expect(isinstance(e.message(), str) and e.message(), f"{what}: empty error message")
        return e.message()
    raise AssertionError(f"{what}: no error (want HTTP {status})")


def grpc_status_error(fn, code, what):
    """Calls `fn`, which must raise InferenceServerException with gRPC `code`; its message."""
    want = str(code)  # e.g. "StatusCode.NOT_FOUND", as tritonclient.grpc reports it
    try:
        fn()
    except InferenceServerException as e:
        expect(e.status() == want, f"{what}: status {e.status()!r}, want {want!r} ({e.message()!r})")
        expect(isinstance(e.message(), str) and e.message(), f"{what}: empty error message")
        return e.message()
    raise AssertionError(f"{what}: no error (want {want})")


def close(a, b, what):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    expect(a.shape == b.shape, f"{what}: shape {a.shape}, want {b.shape}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    expect(diff <= TOLERANCE, f"{what}: differs from the JSON API by {diff} (> {TOLERANCE})")


def by_name(tensors, key=lambda t: t["name"]):
    return {key(t): t for t in tensors}


# ---- group `main` ----------------------------------------------------------------------------


def main_checks(c, url, grpc_url, h, g):
    """`url`: HTTP (maas's JSON API, raw requests); `grpc_url`: gRPC (the same in maas)."""
    # Health and server metadata.
    def http_health():
        expect(h.is_server_live() is True, "HTTP: server not live")
        expect(h.is_server_ready() is True, "HTTP: server not ready")

    def grpc_health():
        expect(g.is_server_live(client_timeout=TIMEOUT) is True, "gRPC: server not live")
        expect(g.is_server_ready(client_timeout=TIMEOUT) is True, "gRPC: server not ready")

    def http_server_metadata():
        md = h.get_server_metadata()
        expect(isinstance(md.get("name"), str) and md["name"], f"HTTP server metadata: no name: {md}")
        expect(isinstance(md.get("version"), str) and md["version"], f"HTTP server metadata: no version: {md}")
        expect("binary_tensor_data" in md.get("extensions", []), f"HTTP server metadata: extensions {md}")

    def grpc_server_metadata():
        md = g.get_server_metadata(client_timeout=TIMEOUT)
        expect(md.name, f"gRPC server metadata: no name: {md}")
        expect(md.version, f"gRPC server metadata: no version: {md}")
        expect("binary_tensor_data" in list(md.extensions), f"gRPC server metadata: extensions {md}")

    c.check("http: server live and ready", http_health)
    c.check("grpc: server live and ready", grpc_health)
    c.check("http: server metadata", http_server_metadata)
    c.check("grpc: server metadata", grpc_server_metadata)

    # Model metadata and readiness of `classify`; the label's datatype, for the infer checks.
    label_dtype = {}

    def check_classify_metadata(proto, name, inputs, outputs):
        expect(name == "classify", f"{proto} model metadata: name {name!r}")
        expect(set(inputs) == {"pixels"}, f"{proto} model metadata: inputs {sorted(inputs)}")
        expect(inputs["pixels"] == ("FP32", [-1, 64]), f"{proto} model metadata: pixels {inputs['pixels']}")
        expect(set(outputs) == {"label", "probs"}, f"{proto} model metadata: outputs {sorted(outputs)}")
        expect(outputs["probs"] == ("FP32", [-1, 10]), f"{proto} model metadata: probs {outputs['probs']}")
        expect(
            outputs["label"][0] in ("UINT32", "INT64"),
            f"{proto} model metadata: label datatype {outputs['label'][0]} (want UINT32 or INT64)",
        )
        label_dtype[proto] = outputs["label"][0]

    def http_model_metadata():
        md = h.get_model_metadata("classify")
        check_classify_metadata(
            "HTTP",
            md.get("name"),
            {t["name"]: (t["datatype"], list(t["shape"])) for t in md.get("inputs", [])},
            {t["name"]: (t["datatype"], list(t["shape"])) for t in md.get("outputs", [])},
        )
        expect(h.is_model_ready("classify") is True, "HTTP: classify not ready")

    def grpc_model_metadata():
        md = g.get_model_metadata("classify", client_timeout=TIMEOUT)
        check_classify_metadata(
            "gRPC",
            md.name,
            {t.name: (t.datatype, list(t.shape)) for t in md.inputs},
            {t.name: (t.datatype, list(t.shape)) for t in md.outputs},
        )
        expect(g.is_model_ready("classify", client_timeout=TIMEOUT) is True, "gRPC: classify not ready")

    c.check("http: classify metadata and ready", http_model_metadata)
    c.check("grpc: classify metadata and ready", grpc_model_metadata)
    c.check(
        "http and grpc: the same label datatype",
        lambda: expect(label_dtype["HTTP"] == label_dtype["gRPC"], f"label datatype differs: {label_dtype}"),
    )

    # classify, against the JSON API.
    rows = json.loads((REPO / "examples/inputs/digits.json").read_text())
    pixels = np.array(rows, dtype=np.float32)

    def json_classify():
        ref = json_api(url, "classify", {"pixels": rows})
        expect(ref["outputs"]["label"] == [3, 5], f"JSON API classify labels {ref['outputs']['label']}, want [3, 5]")
        expect(ref["model_versions"].get("head") == "v1", f"JSON API model_versions {ref['model_versions']}")
        return ref

    ref = c.check("json api: classify (the reference)", json_classify)
    ref_labels = ref["outputs"]["label"]
    ref_probs = ref["outputs"]["probs"]
    ref_versions = ref["model_versions"]

    def check_versions(proto, params):
        """`params`: the response's parameters as {name: value} (gRPC: the string_param)."""
        for sub, version in ref_versions.items():
            key = VERSION_PARAM_PREFIX + sub
            expect(key in params, f"{proto}: no response parameter {key!r} (the version of `{sub}`): {params}")
            expect(params[key] == version, f"{proto}: parameter {key!r} = {params[key]!r}, want {version!r}")

    def check_http_classify(result, binary, what):
        resp = result.get_response()
        expect(resp.get("model_name") == "classify", f"{what}: model_name {resp.get('model_name')!r}")
        outs = by_name(resp.get("outputs", []))
        expect(set(outs) == {"label", "probs"}, f"{what}: outputs {sorted(outs)}")
        for name, out in outs.items():
            has_binary = "binary_data_size" in (out.get("parameters") or {})
            expect(has_binary == binary, f"{what}: output {name} binary={has_binary}, want {binary}: {out}")
            expect(binary or "data" in out, f"{what}: output {name} has no data: {out}")
        expect(outs["label"]["datatype"] == label_dtype["HTTP"], f"{what}: label datatype {outs['label']}")
        expect(outs["probs"]["datatype"] == "FP32", f"{what}: probs datatype {outs['probs']['datatype']}")
        labels = result.as_numpy("label")
        expect(labels is not None and labels.shape == (2,), f"{what}: label {labels!r}")
        expect(labels.tolist() == ref_labels, f"{what}: labels {labels.tolist()}, JSON API {ref_labels}")
        close(result.as_numpy("probs"), ref_probs, f"{what}: probs")
        params = resp.get("parameters")
        expect(isinstance(params, dict), f"{what}: response has no parameters object: {resp}")
        check_versions(what, params)

    def http_binary():
        inp = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        outs = [httpclient.InferRequestedOutput("label"), httpclient.InferRequestedOutput("probs")]
        check_http_classify(h.infer("classify", [inp], outputs=outs), True, "HTTP binary")

    def http_json():
        inp = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels, binary_data=False)
        outs = [
            httpclient.InferRequestedOutput("label", binary_data=False),
            httpclient.InferRequestedOutput("probs", binary_data=False),
        ]
        check_http_classify(h.infer("classify", [inp], outputs=outs), False, "HTTP JSON")

    def http_all_outputs():
        # No outputs named: tritonclient sends `"parameters": {"binary_data_output": true}`.
        inp = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        check_http_classify(h.infer("classify", [inp]), True, "HTTP, no outputs named")

    def check_grpc_classify(result, what):
        resp = result.get_response()
        expect(resp.model_name == "classify", f"{what}: model_name {resp.model_name!r}")
        outs = by_name(resp.outputs, key=lambda t: t.name)
        expect(set(outs) == {"label", "probs"}, f"{what}: outputs {sorted(outs)}")
        expect(
            len(resp.raw_output_contents) == len(resp.outputs),
            f"{what}: {len(resp.raw_output_contents)} raw_output_contents for {len(resp.outputs)} outputs",
        )
        expect(outs["label"].datatype == label_dtype["gRPC"], f"{what}: label datatype {outs['label'].datatype}")
        expect(outs["probs"].datatype == "FP32", f"{what}: probs datatype {outs['probs'].datatype}")
        labels = result.as_numpy("label")
        expect(labels is not None and labels.shape == (2,), f"{what}: label {labels!r}")
        expect(labels.tolist() == ref_labels, f"{what}: labels {labels.tolist()}, JSON API {ref_labels}")
        close(result.as_numpy("probs"), ref_probs, f"{what}: probs")
        params = {}
        for k, v in resp.parameters.items():
            kind = v.WhichOneof("parameter_choice")
            params[k] = v.string_param if kind == "string_param" else f"<{kind}: {getattr(v, kind) if kind else None}>"
        check_versions(what, params)

    def grpc_named():
        inp = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        outs = [grpcclient.InferRequestedOutput("label"), grpcclient.InferRequestedOutput("probs")]
        check_grpc_classify(g.infer("classify", [inp], outputs=outs, client_timeout=TIMEOUT), "gRPC")

    def grpc_all_outputs():
        inp = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        check_grpc_classify(g.infer("classify", [inp], client_timeout=TIMEOUT), "gRPC, no outputs named")

    c.check("http: classify, binary tensors, as the JSON API", http_binary)
    c.check("http: classify, JSON tensors, as the JSON API", http_json)
    c.check("http: classify, no outputs named, as the JSON API", http_all_outputs)
    c.check("grpc: classify, as the JSON API", grpc_named)
    c.check("grpc: classify, no outputs named, as the JSON API", grpc_all_outputs)

    # embed: BYTES in, FP32 [2, 384] out.
    def embed_metadata():
        md = h.get_model_metadata("embed")
        inputs = {t["name"]: t["datatype"] for t in md.get("inputs", [])}
        outputs = {t["name"]: t["datatype"] for t in md.get("outputs", [])}
        expect(inputs == {"text": "BYTES"}, f"HTTP embed metadata: inputs {md.get('inputs')}")
        expect(outputs == {"embedding": "FP32"}, f"HTTP embed metadata: outputs {md.get('outputs')}")
        expect(h.is_model_ready("embed") is True, "HTTP: embed not ready")

    c.check("http: embed metadata and ready", embed_metadata)

    def json_embed():
        emb = json_api(url, "embed", {"text": TEXTS})["outputs"]["embedding"]
        expect(np.asarray(emb).shape == (2, 384), f"JSON API embedding shape {np.asarray(emb).shape}, want (2, 384)")
        return emb

    ref_embedding = c.check("json api: embed (the reference)", json_embed)

    def check_embedding(emb, datatype, what):
        expect(datatype == "FP32", f"{what}: embedding datatype {datatype}")
        expect(emb is not None and emb.shape == (2, 384), f"{what}: embedding shape {None if emb is None else emb.shape}")
        close(emb, ref_embedding, f"{what}: embedding")

    for shape in ([2], [2, 1]):
        texts = np.array(TEXTS, dtype=np.object_).reshape(shape)

        def http_embed(binary, texts=texts, shape=shape):
            what = f"HTTP {'binary' if binary else 'JSON'} embed, text {shape}"
            inp = httpclient.InferInput("text", shape, "BYTES")
            inp.set_data_from_numpy(texts, binary_data=binary)
            out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
            r = h.infer("embed", [inp], outputs=[out])
            expect(r.get_response().get("model_name") == "embed", f"{what}: model_name")
            check_embedding(r.as_numpy("embedding"), r.get_output("embedding")["datatype"], what)

        def grpc_embed(texts=texts, shape=shape):
            what = f"gRPC embed, text {shape}"
            inp = grpcclient.InferInput("text", shape, "BYTES")
            inp.set_data_from_numpy(texts)
            out = grpcclient.InferRequestedOutput("embedding")
            r = g.infer("embed", [inp], outputs=[out], client_timeout=TIMEOUT)
            expect(r.get_response().model_name == "embed", f"{what}: model_name")
            check_embedding(r.as_numpy("embedding"), r.get_output("embedding").datatype, what)

        c.check(f"http: embed, binary BYTES {shape}, as the JSON API", lambda: http_embed(True))
        c.check(f"http: embed, JSON BYTES {shape}, as the JSON API", lambda: http_embed(False))
        c.check(f"grpc: embed, BYTES {shape}, as the JSON API", grpc_embed)

    # Errors: the client's exception, with the right status and a message naming the problem.
    def http_pixels(array, datatype, binary=True):
        inp = httpclient.InferInput("pixels", list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        return inp

    def grpc_pixels(array, datatype):
        inp = grpcclient.InferInput("pixels", list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        return inp

    def unknown_model():
        http_status_error(lambda: h.infer("no_such_model", [http_pixels(pixels, "FP32")]), "404", "HTTP infer")
        http_status_error(lambda: h.get_model_metadata("no_such_model"), "404", "HTTP metadata")
        grpc_status_error(
            lambda: g.infer("no_such_model", [grpc_pixels(pixels, "FP32")], client_timeout=TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
            "gRPC infer",
        )
        grpc_status_error(
            lambda: g.get_model_metadata("no_such_model", client_timeout=TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
            "gRPC metadata",
        )

    wide = pixels.astype(np.float64)

    def names_dtypes(msg, what):
        for word in ("pixels", "FP32", "FP64"):
            expect(word in msg, f"{what}: the message does not name {word}: {msg!r}")

    def wrong_datatype():
        for binary in (True, False):
            what = f"HTTP {'binary' if binary else 'JSON'} FP64 pixels"
            msg = http_status_error(lambda: h.infer("classify", [http_pixels(wide, "FP64", binary)]), "400", what)
            names_dtypes(msg, what)
        msg = grpc_status_error(
            lambda: g.infer("classify", [grpc_pixels(wide, "FP64")], client_timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gRPC FP64 pixels",
        )
        names_dtypes(msg, "gRPC FP64 pixels")

    narrow = np.ascontiguousarray(pixels[:, :63])

    def names_shape(msg, what):
        expect("pixels" in msg, f"{what}: the message does not name pixels: {msg!r}")
        expect("[2,63]" in msg.replace(" ", ""), f"{what}: the message does not name the shape [2, 63]: {msg!r}")

    def wrong_shape():
        for binary in (True, False):
            what = f"HTTP {'binary' if binary else 'JSON'} pixels [2, 63]"
            msg = http_status_error(lambda: h.infer("classify", [http_pixels(narrow, "FP32", binary)]), "400", what)
            names_shape(msg, what)
        msg = grpc_status_error(
            lambda: g.infer("classify", [grpc_pixels(narrow, "FP32")], client_timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gRPC pixels [2, 63]",
        )
        names_shape(msg, "gRPC pixels [2, 63]")

    def lying_binary_size():
        # The header claims 999999 bytes of pixels; only 256 (exactly [1, 64] FP32) follow it.
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 64],
                        "parameters": {"binary_data_size": 999999},
                    }
                ]
            }
        ).encode()
        body = header + bytes(256)
        host, port = url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            conn.request(
                "POST",
                "/v2/models/classify/infer",
                body=body,
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
            r = conn.getresponse()
            status, raw = r.status, r.read()
        finally:
            conn.close()
        expect(status == 400, f"lying binary_data_size: HTTP {status}, want 400: {raw[:500]!r}")
        try:
            err = json.loads(raw)
        except ValueError:
            raise AssertionError(f"lying binary_data_size: the body is not JSON: {raw[:500]!r}") from None
        expect(
            isinstance(err, dict) and isinstance(err.get("error"), str) and err["error"],
            f"lying binary_data_size: the body is not {{\"error\": \"...\"}}: {err!r}",
        )

    def grpc_short_raw_contents():
        # 255 raw bytes for an FP32 [1, 64] input (256 needed); sent through the generated stub,
        # since tritonclient always sends the array's own bytes.
        req = service_pb2.ModelInferRequest(model_name="classify")
        t = req.inputs.add()
        t.name, t.datatype = "pixels", "FP32"
        t.shape.extend([1, 64])
        req.raw_input_contents.append(bytes(255))
        with grpc.insecure_channel(grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelInfer(req, timeout=TIMEOUT)
            except grpc.RpcError as e:
                expect(
                    e.code() == grpc.StatusCode.INVALID_ARGUMENT,
                    f"gRPC short raw_input_contents: {e.code()} ({e.details()!r}), want INVALID_ARGUMENT",
                )
                return
        raise AssertionError("gRPC short raw_input_contents: no error (want INVALID_ARGUMENT)")

    c.check("errors: unknown model is HTTP 404 / NOT_FOUND", unknown_model)
    c.check("errors: FP64 pixels is HTTP 400 / INVALID_ARGUMENT naming pixels, FP32, FP64", wrong_datatype)
    c.check("errors: pixels [2, 63] is HTTP 400 / INVALID_ARGUMENT naming the shape", wrong_shape)
    c.check("errors: a lying binary_data_size is HTTP 400 with {\"error\": \"...\"}", lying_binary_size)
    c.check("errors: short gRPC raw_input_contents is INVALID_ARGUMENT", grpc_short_raw_contents)


# ---- group `failed` --------------------------------------------------------------------------


def failed_checks(c, model, h, g):
    def http_failed():
        expect(h.is_server_live() is True, "HTTP: server not live")
        expect(h.is_server_ready() is False, "HTTP: server ready although a submodel failed")
        expect(h.is_model_ready(model) is False, f"HTTP: {model} ready although its submodel failed")

    def grpc_failed():
        expect(g.is_server_live(client_timeout=TIMEOUT) is True, "gRPC: server not live")
        expect(g.is_server_ready(client_timeout=TIMEOUT) is False, "gRPC: server ready although a submodel failed")
        expect(
            g.is_model_ready(model, client_timeout=TIMEOUT) is False,
            f"gRPC: {model} ready although its submodel failed",
        )

    c.check(f"http: live, server and {model} not ready", http_failed)
    c.check(f"grpc: live, server and {model} not ready", grpc_failed)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="HOST:PORT serving both HTTP and gRPC (no scheme)")
    p.add_argument("--checks", default="main", help="comma-separated groups: main, failed")
    p.add_argument("--model", help="the pipeline whose submodel failed (group `failed`)")
    args = p.parse_args()
    groups = [s for s in args.checks.split(",") if s]
    unknown = sorted(set(groups) - {"main", "failed"})
    if unknown or not groups:
        p.error(f"unknown check groups {unknown}; use main, failed")
    if "failed" in groups and not args.model:
        p.error("--checks failed needs --model")
    # The server is on loopback: never go through a proxy (urllib and grpc both honour these).
    for var in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy"):
        os.environ.pop(var, None)
        os.environ.pop(var.upper(), None)

    c = Checker()
    h = httpclient.InferenceServerClient(url=args.url, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    g = grpcclient.InferenceServerClient(url=args.url)
    try:
        if "main" in groups:
            main_checks(c, args.url, args.url, h, g)
        if "failed" in groups:
            failed_checks(c, args.model, h, g)
    finally:
        h.close()
        g.close()
    print(f"v2_check: {c.passed} checks passed", flush=True)


if __name__ == "__main__":
    main()
