"""Remote jobs: a job.yaml submitted to a Ray cluster through its Job Submission API, then followed,
queried or stopped by its submission id, as `ray job submit/status/logs/stop` do."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable

from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from runner.errors import ClusterError, first_line
from runner.spec.job import JobSpec

SPEC_ENV = "RUNNER_JOB_YAML"  # the job.yaml text travels in the job's runtime env under this name
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NOT_FOUND = 127  # the shell's exit code for a command it cannot find
_ENTRYPOINT_NOT_FOUND = re.compile(rf"entrypoint command failed with exit code {NOT_FOUND}\b")
_VAR_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def is_dashboard_address(address: str | None) -> bool:
    """`http(s)://HEAD:8265` is a cluster's dashboard (submit through it); anything else is joined with ray.init."""
    return bool(address) and address.startswith(("http://", "https://"))


class RemoteJobs:
    """A Ray cluster's Job Submission API, with its failures turned into one-line ClusterErrors."""

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        try:
            self.client = JobSubmissionClient(address)
        except Exception as e:  # ConnectionError, or RuntimeError for an unexpected answer
            raise ClusterError(f"--address {address}: cannot reach a Ray dashboard ({first_line(e, 300)})") from None

    def submit(self, spec: JobSpec, spec_text: str, env: dict[str, str], overwrite: bool) -> str:
        """Start `runner submit` on the cluster with the spec in its runtime env; returns the submission id.

        Variables the spec names as ${VAR} that are set in `env` travel with it, so the spec resolves on
        the cluster as it did here; a variable unset here is resolved from the cluster's environment."""
        forwarded = {name: env[name] for name in sorted(set(_VAR_NAME.findall(spec_text))) if name in env}
        submission_id = f"runner-{spec.name}-{uuid.uuid4().hex[:8]}"
        entrypoint = f"runner submit --spec-from-env {SPEC_ENV} --no-progress" + (" --overwrite" if overwrite else "")
        return self._call("submit", lambda: _submit_when_ready(
            self.client, entrypoint=entrypoint, submission_id=submission_id,
            runtime_env={"env_vars": {SPEC_ENV: spec_text, **forwarded}},
            metadata={"job_name": spec.name, "output": spec.output.path},
        ))

    def info(self, submission_id: str):
        return self._call(submission_id, lambda: self.client.get_job_info(submission_id))

    def logs(self, submission_id: str) -> str:
        return self._call(submission_id, lambda: self.client.get_job_logs(submission_id))

    def stop(self, submission_id: str) -> bool:
        return self._call(submission_id, lambda: self.client.stop_job(submission_id))

    def follow(self, submission_id: str, write: Callable[[str], None], poll_s: float = 1.0):
        """Write the job's log as it grows until the job ends; returns its final JobDetails."""
        shown = 0
        while True:
            info = self.info(submission_id)
            text = self.logs(submission_id)
            if len(text) > shown:
                write(text[shown:])
                shown = len(text)
            if str(info.status) in TERMINAL:
                check_entrypoint_found(info, submission_id, self.address)
                return info
            time.sleep(poll_s)

    def _call(self, what: str, fn):
        try:
            return fn()
        except Exception as e:
            text = first_line(e, 300)
            if "does not exist" in text or "404" in text:
                raise ClusterError(f"{what}: no such job on the Ray cluster at {self.address}") from None
            raise ClusterError(f"{what}: the Ray cluster at {self.address} refused the request ({text})") from None


def check_entrypoint_found(info, submission_id: str, address: str) -> None:
    """A job whose entrypoint exited 127 never started `runner`: the head's shell did not find the command.
    Raises a ClusterError saying so (runner itself never exits 127)."""
    code = getattr(info, "driver_exit_code", None)
    if code == NOT_FOUND or (code is None and _ENTRYPOINT_NOT_FOUND.search(str(info.message or ""))):
        raise ClusterError(f"{submission_id}: `runner` is not installed on the head of the Ray cluster at {address}, "
                           "or not on its PATH (the job's entrypoint exited 127, command not found); pip install "
                           "runner in the cluster's Python environment, or set up the head's PATH (setup_commands "
                           "in cluster.yaml)")


@retry(retry=retry_if_exception(lambda e: "try again later" in str(e)), stop=stop_after_delay(90),
       wait=wait_exponential(multiplier=0.5, max=5), reraise=True)
def _submit_when_ready(client, **job) -> str:
    """A cluster that has just started answers "No available agent to submit job, please try again later"
    until the head's job agent is up: wait for it rather than fail."""
    return client.submit_job(**job)


def exit_code(info) -> int:
    """The remote runner's own exit code where Ray reports it, else 0 for SUCCEEDED and 1 otherwise."""
    if str(info.status) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1
