"""The Open Inference Protocol (KServe v2) with Triton's names, for an LLM.

Inputs follow Triton's LLM backends: BYTES `text_input` of shape [1] or [1, 1];
optional `max_tokens`, `top_k` (INT32), `temperature`, `top_p` (FP32), `seed`
(INT64/UINT64), `stream`, `exclude_input_in_output` (BOOL), `stop` (BYTES, any number),
and `sampling_parameters` (a JSON string, as the vLLM backend, with the same keys and
`ignore_eos`). Outputs: `text_output`,
and on request `finish_reason`, `num_input_tokens`, `num_output_tokens`,
`cumulative_logprob`. Tensors may come typed in `contents` or in `raw_input_contents`.
Request parameters: `routing_key`, and `attribute.NAME` for each attribute that
feature-flag rules match on; the response's `flags` parameter lists the flags that were
on, comma-separated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from inference.api.errors import InvalidArgument, NotFound, shown
from inference.api.grpc_front import abort, call_of, grpc_errors, status_code
from inference.api.limits import Limits, check_chars
from inference.api.requests import Chunk, Generated, GenerateRequest, Served
from inference.api.serving import Serving
from inference.runtime.sampling import SamplingParams
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc

SERVER_NAME = "vigil"
SERVER_VERSION = "0.1.0"
NUMERIC = {  # datatype -> (numpy dtype, InferTensorContents field)
    "BOOL": (np.bool_, "bool_contents"), "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"), "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"), "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
}
# input name -> accepted datatypes, and whether one element is required
INPUTS = {
    "text_input": ("BYTES",),
    "max_tokens": ("INT32", "INT64", "UINT32", "UINT64"),
    "top_k": ("INT32", "INT64", "UINT32", "UINT64"),
    "seed": ("INT32", "INT64", "UINT32", "UINT64"),
    "temperature": ("FP32", "FP64"),
    "top_p": ("FP32", "FP64"),
    "stream": ("BOOL",),
    "exclude_input_in_output": ("BOOL",),
    "stop": ("BYTES",),
    "sampling_parameters": ("BYTES",),
}
OUTPUTS = {"text_output": "BYTES", "finish_reason": "BYTES", "num_input_tokens": "INT32",
           "num_output_tokens": "INT32", "cumulative_logprob": "FP32"}
JSON_SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"}


def decode_bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """BYTES elements as tritonclient serialises them: a 4-byte LE length, then the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidArgument(f"raw_input_contents[{name}]: truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidArgument(f"raw_input_contents[{name}]: element of {n} bytes runs past the end")
        out.append(raw[i:i + n])
        i += n
    return out


def encode_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def read_inputs(request: pb.ModelInferRequest) -> dict[str, list]:
    """Every input tensor as a flat list of Python values, checked against INPUTS."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents: {len(request.raw_input_contents)} entries "
                              f"for {len(request.inputs)} inputs")
    values = {}
    for i, tensor in enumerate(request.inputs):
        name, dtype = tensor.name, tensor.datatype
        if name not in INPUTS:
            raise InvalidArgument(f"inputs: unknown tensor {shown(name)} (expected {', '.join(INPUTS)})")
        if name in values:
            raise InvalidArgument(f"inputs[{name}]: given twice")
        if dtype not in INPUTS[name]:
            raise InvalidArgument(f"inputs[{name}].datatype: {shown(dtype)}, expected {' or '.join(INPUTS[name])}")
        shape = shown(list(tensor.shape))
        if any(d < 0 for d in tensor.shape):
            raise InvalidArgument(f"inputs[{name}].shape: {shape} has a negative dimension")
        count = math.prod(tensor.shape) if tensor.shape else 0
        if dtype == "BYTES":
            items = (decode_bytes_elements(request.raw_input_contents[i], name)
                     if request.raw_input_contents else list(tensor.contents.bytes_contents))
        else:
            np_dtype, field = NUMERIC[dtype]
            if request.raw_input_contents:
                raw = request.raw_input_contents[i]
                if len(raw) % np.dtype(np_dtype).itemsize:
                    raise InvalidArgument(f"raw_input_contents[{name}]: {len(raw)} bytes is not a "
                                          f"whole number of {dtype} elements")
                items = np.frombuffer(raw, dtype=np_dtype).tolist()
            else:
                items = list(getattr(tensor.contents, field))
        if len(items) != count:
            raise InvalidArgument(f"inputs[{name}]: shape {shape} needs {count} elements, got {len(items)}")
        if name != "stop" and count != 1:
            raise InvalidArgument(f"inputs[{name}].shape: {shape}, expected one element ([1] or [1, 1])")
        values[name] = items
    if "text_input" not in values:
        raise InvalidArgument("inputs: text_input is missing")
    return values


def text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"inputs[{name}]: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def json_object(value: str, field: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidArgument(f"{field}: nested too deeply") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{field}: must be a JSON object")
    return parsed


def json_sampling(raw: bytes, limits: Limits) -> dict:
    """`sampling_parameters`, each value checked for its type; numbers may come as strings
    (as the vLLM backend takes them), and `ignore_eos` as "true" or "false"."""
    field = "inputs[sampling_parameters]"
    value = text(raw, "sampling_parameters")
    check_chars(field, value, limits.max_json_chars)
    parsed = json_object(value, field)
    unknown = set(parsed) - JSON_SAMPLING_KEYS
    if unknown:
        raise InvalidArgument(f"{field}: unknown keys {shown(sorted(unknown))}")
    for key, value in parsed.items():
        if key == "stop":
            parsed[key] = stop = [value] if isinstance(value, str) else value
            if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
                raise InvalidArgument(f"{field}.stop: must be a string or a list of strings")
        elif key == "ignore_eos":
            if not (isinstance(value, bool) or value in ("true", "false")):
                raise InvalidArgument(f"{field}.ignore_eos: must be true or false")
            parsed[key] = value in (True, "true")
        elif isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
            raise InvalidArgument(f"{field}.{key}: must be a number")
    return parsed


def sampling_from_inputs(values: dict[str, list], limits: Limits) -> tuple[SamplingParams, bool, bool]:
    """The sampling parameters, `stream`, and `exclude_input_in_output`."""
    params: dict = {"max_tokens": limits.default_max_tokens}
    if "sampling_parameters" in values:
        params.update(json_sampling(values["sampling_parameters"][0], limits))
    for name in ("max_tokens", "top_k", "seed", "temperature", "top_p"):
        if name in values:
            params[name] = values[name][0]
    if "stop" in values:
        params["stop"] = [text(s, "stop") for s in values["stop"]]
    try:
        sp = SamplingParams(
            max_tokens=int(params["max_tokens"]), temperature=float(params.get("temperature", 0.0)),
            top_k=int(params.get("top_k", 0)), top_p=float(params.get("top_p", 1.0)) or 1.0,
            seed=None if params.get("seed") is None else int(params["seed"]),
            stop=tuple(str(s) for s in params.get("stop", ())),
            ignore_eos=bool(params.get("ignore_eos", False)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"inputs[sampling_parameters]: {exc}") from None
    stream = bool(values.get("stream", [False])[0])
    exclude = bool(values.get("exclude_input_in_output", [False])[0])
    return sp, stream, exclude


def tensor(name: str, value) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    dtype = OUTPUTS[name]
    if dtype == "BYTES":
        raw = encode_bytes_elements([value.encode("utf-8")])
    else:
        raw = np.array([value], dtype=NUMERIC[dtype][0]).tobytes()
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=dtype, shape=[1]), raw


class KServeService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, serving: Serving, versions):
        self.serving = serving
        self.versions = versions

    # -- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.serving.router.all()))

    async def ModelReady(self, request, context):
        versions = self.serving.router.versions.get(request.name, {})
        return pb.ModelReadyResponse(ready=(request.version in versions) if request.version else bool(versions))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=["model_repository", "generate", "statistics"])

    def known(self, name: str, version: str = ""):
        try:
            return [self.serving.router.get(name, version)] if version else \
                list(self.serving.router.versions[name].values())
        except KeyError:
            raise NotFound(f"model: {shown(name)} is not loaded") from None

    async def ModelMetadata(self, request, context):
        try:
            versions = self.known(request.name, request.version)
        except NotFound as exc:
            await abort(context, exc)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[mv.version for mv in versions], platform="vigil_llm",
            inputs=[meta(name=n, datatype=d[0], shape=[-1] if n == "stop" else [1]) for n, d in INPUTS.items()],
            outputs=[meta(name=n, datatype=d, shape=[1]) for n, d in OUTPUTS.items()])

    async def ModelConfig(self, request, context):
        try:
            self.known(request.name, request.version)
        except NotFound as exc:
            await abort(context, exc)
        types = {"BYTES": pb.TYPE_STRING, "INT32": pb.TYPE_INT32, "FP32": pb.TYPE_FP32, "BOOL": pb.TYPE_BOOL}
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=request.name, platform="vigil_llm", backend="vigil", max_batch_size=0,
            input=[pb.ModelInput(name=n, data_type=types.get(d[0], pb.TYPE_INT32), dims=[-1] if n == "stop" else [1],
                                 optional=n != "text_input") for n, d in INPUTS.items()],
            output=[pb.ModelOutput(name=n, data_type=types[d], dims=[1]) for n, d in OUTPUTS.items()],
            model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True)))

    async def ModelStatistics(self, request, context):
        stats = []
        for mv in self.serving.router.all():
            if request.name and mv.model != request.name or request.version and mv.version != request.version:
                continue
            stats.append(pb.ModelStatistics(name=mv.model, version=mv.version,
                                            execution_count=mv.engine.stats.steps))
        return pb.ModelStatisticsResponse(model_stats=stats)

    # -- repository ------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(name=mv.model, version=mv.version, state="READY")
                                                  for mv in self.serving.router.all()])

    async def RepositoryModelLoad(self, request, context):
        p = request.parameters

        def param(name, default):
            if name in p:
                kind = p[name].WhichOneof("parameter_choice")
                return getattr(p[name], kind).decode() if kind == "bytes_param" else getattr(p[name], kind)
            return config.get(name, default)
        try:
            # tritonclient's load_model can only send `config` (a JSON string): it may carry
            # version, source, quantize and group_size too; explicit parameters win
            config = json_object(p["config"].string_param or "{}", "parameters[config]") if "config" in p else {}
            try:
                group_size = int(param("group_size", 32))
            except (TypeError, ValueError):
                raise InvalidArgument(f"group_size: {shown(param('group_size', 32))} is not an integer") from None
            await self.versions.load(request.model_name, str(param("version", "1")), str(param("source", "demo")),
                                     str(param("quantize", "none")), group_size)
        except (InvalidArgument, NotFound) as exc:
            await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            if "version" in request.parameters:
                versions = [request.parameters["version"].string_param]
            else:
                versions = [mv.version for mv in self.known(request.model_name)]
            for version in versions:
                await self.versions.unload(request.model_name, version)
        except NotFound as exc:
            await abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------

    def translate(self, request: pb.ModelInferRequest, context, method: str) -> Inference:
        call = call_of(context, method, request.id, id_field="id")
        try:
            values = read_inputs(request)
            params, stream, exclude = sampling_from_inputs(values, self.serving.limits)
            if stream and method == "ModelInfer":
                raise InvalidArgument("inputs[stream]: true needs ModelStreamInfer")
            for o in request.outputs:
                if o.name not in OUTPUTS:
                    raise InvalidArgument(f"outputs: unknown tensor {shown(o.name)} (expected {', '.join(OUTPUTS)})")
            prompt = text(values["text_input"][0], "text_input")
        except InvalidArgument as exc:
            return Inference(GenerateRequest(call, invalid=exc))
        p = request.parameters
        generation = GenerateRequest(
            call, model=request.model_name, version=request.model_version,
            routing_key=p["routing_key"].string_param if "routing_key" in p else "",
            attributes={k.removeprefix("attribute."): parameter_text(v) for k, v in p.items()
                        if k.startswith("attribute.")},
            prompt=prompt, input_field="text_input", attribute_field="parameters[attribute.{}]", sampling=params)
        return Inference(generation, stream, "" if exclude or stream else prompt,
                         [o.name for o in request.outputs] or ["text_output"])

    async def answers(self, request: pb.ModelInferRequest, context, method: str):
        """Yields ModelInferResponse messages: one, or one per chunk when the request streams."""
        inference = self.translate(request, context, method)
        if not inference.stream:
            yield self.final(request, inference, await self.serving.generate(inference.generation))
            return
        async with contextlib.aclosing(self.serving.stream(inference.generation)) as updates:
            async for update in updates:
                if isinstance(update, Chunk):
                    if update.text:
                        yield response(request, update.served, {"text_output": update.text}, final=False)
                else:
                    yield self.final(request, inference, update)

    @staticmethod
    def final(request, inference: Inference, g: Generated) -> pb.ModelInferResponse:
        f = g.finished
        fields = {"text_output": "" if inference.stream else inference.prefix + f.text,
                  "finish_reason": f.finish_reason, "num_input_tokens": f.prompt_tokens,
                  "num_output_tokens": f.completion_tokens,
                  "cumulative_logprob": f.confidence.mean_logprob * f.completion_tokens}
        return response(request, g.served, {n: fields[n] for n in inference.outputs}, final=True)

    @grpc_errors
    async def ModelInfer(self, request, context):
        inference = self.translate(request, context, "ModelInfer")
        return self.final(request, inference, await self.serving.generate(inference.generation))

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests of one stream run concurrently; errors go back in-band, per request."""
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request):
            try:
                async for answer in self.answers(request, context, "ModelStreamInfer"):
                    await responses.put(pb.ModelStreamInferResponse(infer_response=answer))
            except Exception as exc:  # answered in-band, whatever it is: the stream goes on
                lim = self.serving.limits  # an oversized name or id is not sent back
                failed = pb.ModelInferResponse(
                    model_name=request.model_name if len(request.model_name) <= lim.max_name_chars else "",
                    id=request.id if len(request.id) <= lim.max_id_chars else "")
                failed.parameters["triton_final_response"].bool_param = True
                await responses.put(pb.ModelStreamInferResponse(error_message=f"{status_code(exc).name}: {exc}",
                                                                infer_response=failed))

        async def read():
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await responses.get()) is not None:
                yield item
            await reader  # raises what ended the request stream early (a message that did not parse)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


@dataclass
class Inference:
    """A ModelInferRequest as the serving layer's request, and what its response needs."""
    generation: GenerateRequest
    stream: bool = False
    prefix: str = ""  # the prompt, echoed before the completion unless excluded (never when streaming)
    outputs: list[str] = field(default_factory=lambda: ["text_output"])


def response(request, served: Served, fields: dict, final: bool) -> pb.ModelInferResponse:
    outputs, raws = zip(*(tensor(n, v) for n, v in fields.items()))
    resp = pb.ModelInferResponse(model_name=served.model, model_version=served.version, id=request.id,
                                 outputs=outputs, raw_output_contents=raws)
    resp.parameters["triton_final_response"].bool_param = final
    resp.parameters["request_id"].string_param = served.request_id
    if served.flags:
        resp.parameters["flags"].string_param = ",".join(served.flags)
    return resp


def parameter_text(p: pb.InferParameter) -> str:
    """A request parameter's value as text, whichever of its types was sent."""
    field = p.WhichOneof("parameter_choice")
    value = getattr(p, field) if field else ""
    return str(value).lower() if isinstance(value, bool) else str(value)
