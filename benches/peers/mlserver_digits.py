"""Serves the digits MLP (scikit-learn MLPClassifier(128, relu), the same architecture and
training as the `digits_mlp` fixture) with Seldon MLServer's scikit-learn runtime, as the
peer Open Inference Protocol V2 server of `node_load --peer-mlserver`.

Usage: mlserver_digits.py WORKDIR HTTP_PORT GRPC_PORT
Writes WORKDIR/digits_mlp/{model.joblib,model-settings.json} and WORKDIR/settings.json, then
execs `mlserver start WORKDIR`. Requests take pixels already divided by 16 (the fixture
capsule folds that scaling into its first layer; the compute is the same).
"""
import json
import os
import sys

import joblib
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


def main():
    workdir, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    X, y = load_digits(return_X_y=True)
    X_train, _, y_train, _ = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu", solver="adam",
                        max_iter=500, random_state=0)
    clf.fit(X_train / 16.0, y_train)
    model_dir = os.path.join(workdir, "digits_mlp")
    os.makedirs(model_dir, exist_ok=True)
    joblib.dump(clf, os.path.join(model_dir, "model.joblib"))
    with open(os.path.join(model_dir, "model-settings.json"), "w") as f:
        json.dump({"name": "digits_mlp", "implementation": "mlserver_sklearn.SKLearnModel",
                   "parameters": {"uri": "./model.joblib", "version": "1"}}, f)
    with open(os.path.join(workdir, "settings.json"), "w") as f:
        json.dump({"http_port": http_port, "grpc_port": grpc_port, "metrics_port": 0,
                   # The parallel inference pool crashes under uvloop in this version
                   # ("no current event loop"); 0 runs the model in the server process.
                   "parallel_workers": 0,
                   "metrics_endpoint": None, "debug": False}, f)
    os.execvp("mlserver", ["mlserver", "start", workdir])


if __name__ == "__main__":
    main()
