"""Runs inference on a Capsule node with NVIDIA's `tritonclient` (HTTP and gRPC) and prints
the outputs as JSON, so the Rust test can compare them with in-process inference.

Usage: tritonclient_check.py HTTP_ADDR GRPC_ADDR REQUEST_JSON
REQUEST_JSON: {"model": "...", "inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...]}
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
          "UINT8": np.uint8, "BOOL": np.bool_}


def run(module, url, request, binary):
    client = module.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    model = request["model"]
    assert client.is_model_ready(model), "model not ready"
    metadata = client.get_model_metadata(model)
    names = [o["name"] if isinstance(o, dict) else o.name for o in
             (metadata["outputs"] if isinstance(metadata, dict) else metadata.outputs)]
    inputs = []
    for i in request["inputs"]:
        array = np.array(i["data"], dtype=DTYPES[i["datatype"]]).reshape(i["shape"])
        inp = module.InferInput(i["name"], list(array.shape), i["datatype"])
        if module is httpclient:
            inp.set_data_from_numpy(array, binary_data=binary)
        else:
            inp.set_data_from_numpy(array)
        inputs.append(inp)
    if module is httpclient:
        outputs = [module.InferRequestedOutput(n, binary_data=binary) for n in names]
    else:
        outputs = [module.InferRequestedOutput(n) for n in names]
    result = client.infer(model, inputs, outputs=outputs, request_id="triton-check")
    out = {}
    for n in names:
        a = result.as_numpy(n)
        out[n] = {"shape": list(a.shape), "data": a.flatten().tolist()}
    return out


def main():
    http_addr, grpc_addr, request_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)
    print(json.dumps({
        "http_binary": run(httpclient, http_addr, request, True),
        "http_json": run(httpclient, http_addr, request, False),
        "grpc": run(grpcclient, grpc_addr, request, True),
    }))


if __name__ == "__main__":
    main()
