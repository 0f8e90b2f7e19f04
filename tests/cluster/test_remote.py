"""Remote submission's answers from Ray's Job Submission API turned into one-line ClusterErrors.

A head whose shell cannot find `runner` is shown with Ray's own JobDetails and the status text its job
supervisor writes; starting a Ray head for it would cost more than the rest of this file (test_multinode
runs the real cluster)."""

import pytest
from ray.job_submission import JobDetails, JobStatus, JobType

from runner.cluster.remote import RemoteJobs, check_entrypoint_found
from runner.errors import ClusterError

ADDRESS = "http://10.0.0.1:8265"
SID = "runner-j-0123abcd"
# As ray/dashboard/modules/job/job_supervisor.py writes it for an entrypoint that exits non-zero.
NOT_FOUND_MESSAGE = ("Job entrypoint command failed with exit code 127, last available logs (truncated to 20,000 "
                     "chars):\n/bin/sh: 1: runner: not found\n")


def details(status=JobStatus.FAILED, message=NOT_FOUND_MESSAGE, code=127) -> JobDetails:
    return JobDetails(type=JobType.SUBMISSION, submission_id=SID, status=status, message=message,
                      driver_exit_code=code, entrypoint="runner submit --spec-from-env RUNNER_JOB_YAML --no-progress")


@pytest.mark.parametrize("code", [127, None], ids=["exit code", "message only"])
def test_runner_not_found_on_the_head_is_one_line_saying_what_to_do(code):
    with pytest.raises(ClusterError) as e:
        check_entrypoint_found(details(code=code), SID, ADDRESS)
    text = str(e.value)
    assert text.startswith(f"{SID}: `runner` is not installed on the head of the Ray cluster at {ADDRESS}, or not "
                           "on its PATH (the job's entrypoint exited 127")
    assert "pip install runner" in text and "cluster.yaml" in text and "\n" not in text
    assert e.value.exit_code == 9


@pytest.mark.parametrize("info", [
    details(code=7, message="Job entrypoint command failed with exit code 7, last available logs ...\nerror: x"),
    details(status=JobStatus.SUCCEEDED, message="Job finished successfully.", code=0),
    details(status=JobStatus.STOPPED, message="Job was intentionally stopped.", code=None),
], ids=["runner's own failure", "succeeded", "stopped"])
def test_other_endings_are_left_to_the_exit_code(info):
    check_entrypoint_found(info, SID, ADDRESS)


class _Client:
    """Ray's JobSubmissionClient as far as follow() uses it: the job has ended with exit code 127."""

    def get_job_info(self, submission_id):
        return details()

    def get_job_logs(self, submission_id):
        return "/bin/sh: 1: runner: not found\n"


def test_follow_shows_the_log_then_raises():
    jobs = RemoteJobs.__new__(RemoteJobs)  # no dashboard to connect to
    jobs.address, jobs.client = ADDRESS, _Client()
    shown = []
    with pytest.raises(ClusterError, match="`runner` is not installed on the head"):
        jobs.follow(SID, shown.append, poll_s=0)
    assert shown == ["/bin/sh: 1: runner: not found\n"]
