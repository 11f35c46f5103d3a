"""MLflow tracking for the bundle configs: where runs go, what they are called, what they record.

* :class:`MLFlowHandler`: MONAI's handler, made resumable: a resumed run goes on in the same MLflow run (reopened
  even when it had finished), per-iteration metrics are committed with the epoch (logged at its end, when the
  training state is saved), and a step already in the run is never logged twice.
* :class:`FailedRun`: an exception ends the run as FAILED (KILLED for Ctrl-C) with the error as a tag.
* :func:`config_params`: the run's MLflow params, derived from the executed config (every top-level setting), so
  that a config key added anywhere (a file, an overlay, the command line) is logged without being listed.
* :func:`check_tracking`: an ``http(s)`` tracking server is asked once, before anything is built, and an unreachable
  one fails the run within seconds (:data:`CHECK_POLICY`); the run's own requests retry by :data:`RUN_POLICY`.
  MLflow's client defaults (7 retries, backoff factor 2, 120 s timeout) spend minutes in urllib3's backoff.

A request to the server that fails during the run raises :class:`TrackingUnavailable` before the epoch's training
state is saved (the state is the last thing an epoch writes), so the same command, rerun when the server answers,
resumes from the last saved epoch into the same MLflow run, and no step is logged twice.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import MLFlowHandler as _MonaiMLFlowHandler

from bundle.distributed import is_rank_zero
from bundle.io import atomic_write

logger = logging.getLogger(__name__)

# MLflow's HTTP retry settings (environment variables it reads on every request; backoff factor: an integer)
CHECK_POLICY = {  # the start-up probe: an unreachable server fails in about 12 s (3 tries, 3 s each, 0 + 1-2 s backoff)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
RUN_POLICY = {  # the run's requests ride out a blip of seconds; a dead server stops the run in under a minute
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer."""


@contextlib.contextmanager
def _environment(values: dict):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_remote(uri) -> bool:
    return isinstance(uri, str) and uri.lower().startswith(("http://", "https://"))


def check_tracking(uri: str) -> str:
    """Make sure the MLflow tracking server at ``uri`` answers, before a run builds anything; return ``uri``.

    For an ``http(s)`` URI the run's retry policy is set (:data:`RUN_POLICY`, each variable only where the
    environment does not set it already) and the server is asked for one experiment with :data:`CHECK_POLICY`;
    no answer raises :class:`TrackingUnavailable` naming the URI, what was tried and for how long. Local stores
    (``sqlite:///``) are left to MLflow. ``MLFLOW_TRACKING_URI``, when set, is the URI checked: it is the one MONAI's
    ``MLFlowHandler`` uses.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not _is_remote(uri):
        return uri
    for key, value in RUN_POLICY.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    tries = int(CHECK_POLICY["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    start = time.monotonic()
    try:
        with _environment(CHECK_POLICY):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        cause = _first_line(e)
        raise TrackingUnavailable(
            f"tracking_uri {uri}: the MLflow tracking server did not answer (GET experiments, {tries} tries of "
            f"{CHECK_POLICY['MLFLOW_HTTP_REQUEST_TIMEOUT']} s, {time.monotonic() - start:.1f} s): {cause}. Nothing "
            f"was trained. Start the server (mlflow server --host 127.0.0.1 --port PORT), fix --tracking_uri, or "
            f"leave it out to log to the bundle's own sqlite store"
        ) from e
    logger.info("MLflow tracking server %s answers (%.1f s)", uri, time.monotonic() - start)
    return uri


def sqlite_uri(path: str) -> str:
    """``sqlite:///`` URI of a database file (MLflow 3 has no file-store backend)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return "sqlite:///" + os.path.abspath(path)


def experiment_id(client, name: str) -> str:
    """Id of MLflow experiment ``name``, created if needed; with a sqlite store its artifacts go to ``mlruns/``
    beside the database (as MONAI's ``MLFlowHandler`` does), never to the current directory."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(os.path.dirname(uri[len("sqlite:///") :]), "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def run_name(output_dir: str, resuming: bool, prefix: str = "sampo") -> str:
    """A new ``{prefix}_YYYYmmdd_HHMMSS`` name, or the name of the run being resumed.

    The name is kept in ``output_dir/run_name.txt``; when training resumes from a saved state the same MLflow run
    (MONAI's ``MLFlowHandler`` reopens an unfinished run of that name) goes on. Under torchrun only rank 0, the one
    that logs to MLflow, writes the file: the other ranks' clocks may have passed to the next second, and a name of
    theirs in the file would make the resume open a second run.
    """
    path = os.path.join(output_dir, "run_name.txt")
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    name = f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}"
    if is_rank_zero():
        with atomic_write(path, "w") as f:
            f.write(name)
    return name


def _evaluating_parser(caller: str) -> ConfigParser:
    """The ``ConfigParser`` evaluating the ``$`` expression that called ``caller`` (found on the frame stack)."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    raise RuntimeError(f"{caller}() must be evaluated by a monai.bundle.ConfigParser (a $ expression in a config)")


def executed_config() -> dict:
    """The raw config being executed (all config files merged, command-line overrides applied).

    Called from a ``$`` expression in a bundle config; it finds the ``ConfigParser`` that evaluates it.
    """
    return copy.deepcopy(_evaluating_parser("executed_config").get())


def save_executed_config(path: str) -> str:
    """Write :func:`executed_config` to ``path`` (YAML or JSON by suffix) and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ConfigParser.export_config_file(executed_config(), path, fmt="yaml" if path.endswith((".yaml", ".yml")) else "json")
    return path


SCALARS = (int, float, str, bool, type(None))
# top-level keys that are workflows or objects: never params, never resolved by config_params
NOT_SETTINGS = frozenset({
    "imports", "initialize", "finalize", "run", "training", "evaluating", "pretraining", "evaluating_base",
    "inferring", "network", "network_def", "hyperparameters",
})  # fmt: skip
# bookkeeping that legitimately differs between a fresh run and its resume (resume_from) or between the ranks of one
# run (not_rank_zero, configs/multi_gpu_train.yaml): a param would change on resume (MLflow params cannot change)
BOOKKEEPING = frozenset({"resume_from", "not_rank_zero"})


def flatten_params(params: dict, prefix: str = "") -> dict:
    """Nested hyperparameters -> flat ``{"a.b": value}`` for ``mlflow.log_params``; a list of numbers / strings
    becomes ``"a,b,c"``, anything else its ``str``."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "."))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, SCALARS) for v in value):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = value if isinstance(value, SCALARS) else str(value)
    return flat


def _is_expression(value) -> bool:
    return isinstance(value, str) and value.startswith(("$", "@"))


def _literal(value) -> bool:
    """A value written out in the config: a number / string / bool / null, or lists and dicts of them."""
    if isinstance(value, dict):
        return "_target_" not in value and all(_literal(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, SCALARS) and not _is_expression(v) for v in value)
    return isinstance(value, SCALARS) and not _is_expression(value)


def config_params(exclude=(), **derived) -> dict:
    """The run's MLflow params: every top-level setting of the executed config, flat (:func:`flatten_params`).

    A setting is a top-level key whose value is written out (a number, string, bool, null, a list of them, a dict
    of them: ``synthetic.n_train``) or a ``$`` / ``@`` expression whose value is a number / string / bool / null or
    a list of them (``datalist``, ``model_size``). Workflows and objects (:data:`NOT_SETTINGS`, sections, lists of
    transforms) are never resolved here; :data:`BOOKKEEPING` keys and ``exclude`` are left out. ``derived`` adds
    values that are no top-level key (``initialisation=@network.initialisation``) or replaces one. Called from a
    ``$`` expression in a bundle config (``hyperparameters``); it finds the ``ConfigParser`` that evaluates it.
    """
    parser = _evaluating_parser("config_params")
    params = {}
    for key, raw in parser.get().items():
        if key in NOT_SETTINGS or key in BOOKKEEPING or key in exclude:
            continue
        if _literal(raw):
            params[key] = raw
        elif _is_expression(raw):
            value = parser.get_parsed_content(key)
            if _literal(value) and not isinstance(value, dict):
                params[key] = value
    params.update(derived)
    return flatten_params(params)


class MLFlowHandler(_MonaiMLFlowHandler):
    """``monai.handlers.MLFlowHandler`` for runs that can be killed and resumed.

    Args:
        resume: this process resumes a saved training state: the run named ``run_name`` goes on, even when it had
            finished (a rerun with more ``max_epochs``); it is marked RUNNING again and closed as usual.
        commit_with_epoch: log the per-iteration metrics at the end of their epoch, just before the training state
            is saved, so that an epoch killed half-way (and run again on resume) leaves nothing in the run.
        the rest: as ``monai.handlers.MLFlowHandler``.

    Whatever the run already holds is not logged again: a metric step at or below the last step of that metric
    in the run when this process joined it is skipped (the window between the commit and the save), and a
    parameter already logged with another value (``max_epochs`` of a longer rerun) is recorded as the tag
    ``resumed.<name>`` instead of failing (MLflow parameters cannot change).
    """

    def __init__(self, *args, resume: bool = False, commit_with_epoch: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume, self.commit_with_epoch = resume, commit_with_epoch
        self._pending: list[tuple[dict, int, int]] = []
        self._buffering = False
        self._logged_until: dict[str, int] | None = None

    def _answering(self, event, *args) -> None:
        """Run the handler method ``event``; a remote server that fails it raises :class:`TrackingUnavailable`. Only
        what an outage raises counts (MLflow's ``MlflowException`` after its retries, ``requests``' connection
        errors, an ``OSError``); a bug in the handler keeps its own exception."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        try:
            event(*args)
        except TrackingUnavailable:
            raise
        except (MlflowException, RequestException, OSError) as e:
            uri = self.client.tracking_uri
            if not _is_remote(uri):
                raise
            raise TrackingUnavailable(
                f"tracking_uri {uri}: the MLflow server stopped answering ({_first_line(e)}). The training stops "
                f"before this epoch's state is saved. Rerun the same command when the server answers: it resumes "
                f"from the last saved epoch into the same MLflow run ({self.run_name}), each step logged once"
            ) from e

    def start(self, engine: Engine) -> None:
        self._answering(self._start, engine)

    def _start(self, engine: Engine) -> None:
        if self.resume and not self.cur_run and self.run_name:
            self._set_experiment()
            runs = self.client.search_runs(
                [self.experiment.experiment_id], filter_string=f"attributes.run_name = '{self.run_name}'",
                order_by=["attributes.start_time DESC"], max_results=1,
            )
            if runs:
                run = runs[0]
                if run.info.status != "RUNNING":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    logger.info("continuing MLflow run %s (id %s, was %s)", self.run_name, run.info.run_id,
                                run.info.status)
                self.cur_run = self.client.get_run(run.info.run_id)
        super().start(engine)
        if self._logged_until is None and self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            self._logged_until = {
                key: max(m.step for m in self.client.get_metric_history(run_id, key))
                for key in self.client.get_run(run_id).data.metrics
            }

    def _log_params(self, params: dict) -> None:
        if self.cur_run is not None:
            logged = self.client.get_run(self.cur_run.info.run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
            for key, value in changed.items():
                logger.info("MLflow param %s stays %s (logged first); this run's value %s is the tag resumed.%s",
                            key, logged[key], value, key)
                self.client.set_tag(self.cur_run.info.run_id, f"resumed.{key}", str(value))
            params = {k: v for k, v in params.items() if k not in logged}
        if params:  # all in one log_batch: MLflow's client splits it into the store's batches of 100
            super()._log_params(params)

    def iteration_completed(self, engine: Engine) -> None:
        self._buffering = self.commit_with_epoch
        try:
            self._answering(super().iteration_completed, engine)
        finally:
            self._buffering = False

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self._buffering:
            self._pending.append((dict(metrics), step or 0, int(time.time() * 1000)))
        else:
            self._write([(dict(metrics), step or 0, int(time.time() * 1000))])

    def _write(self, entries: list[tuple[dict, int, int]]) -> None:
        import mlflow
        from monai.utils import flatten_dict

        if not self.cur_run:
            raise ValueError("Current Run is not Active to log metrics")
        done = self._logged_until or {}
        batch = [
            mlflow.entities.Metric(key, value, stamp, step)
            for metrics, step, stamp in entries
            for key, value in flatten_dict(metrics).items()
            if step > done.get(key, -1)
        ]
        if len(batch) < sum(len(flatten_dict(m)) for m, _, _ in entries):
            logger.info("MLflow run already holds some of these steps (an interrupted attempt): not logged twice")
        for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
            self.client.log_batch(run_id=self.cur_run.info.run_id, metrics=batch[start : start + 1000])

    def flush(self) -> None:
        """Log the per-iteration metrics held back since the last epoch end."""
        pending, self._pending = self._pending, []
        if pending and self.cur_run:
            self._write(pending)

    def epoch_completed(self, engine: Engine) -> None:
        self._answering(self.flush)
        self._answering(super().epoch_completed, engine)

    def complete(self) -> None:
        self._answering(self.flush)
        self._answering(super().complete)


class FailedRun:
    """End the MLflow run as FAILED (KILLED for Ctrl-C and SIGTERM) when training raises, with the error as the tag
    ``error`` and where it happened as ``failed_at``, say which saved state the same command resumes from; the
    exception is raised again.

    List it before every other handler: Ignite runs only the first ``EXCEPTION_RAISED`` handler when that one
    raises (MONAI's ``StatsHandler`` does).

    Args:
        mlflow_handler: the trainer's :class:`MLFlowHandler`.
        last_state: called with no argument, the path of the newest saved training state or None (the train
            configs: ``bundle.checkpoints.latest_checkpoint`` of ``ckpt_dir``); None: no resume line.
    """

    def __init__(self, mlflow_handler: _MonaiMLFlowHandler, last_state: Callable[[], str | None] | None = None) -> None:
        self.mlflow_handler = mlflow_handler
        self.last_state = last_state

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        handler = self.mlflow_handler
        run = getattr(handler, "cur_run", None)
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        if run is not None:
            try:
                if hasattr(handler, "flush") and not isinstance(e, TrackingUnavailable):
                    handler.flush()  # the steps that led to the error
                client, run_id = handler.client, run.info.run_id
                client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:4900])
                client.set_tag(run_id, "failed_at", where)
                client.set_terminated(run_id, status)
                handler.cur_run = None
                logger.error("MLflow run %s (id %s) ended as %s at %s: %s", run.info.run_name, run_id, status,
                             where, e)
            except Exception as log_error:  # the training error matters more than the tracking one
                logger.warning("could not mark MLflow run %s as %s: %s", run.info.run_id, status,
                               _first_line(log_error))
        if self.last_state is not None:
            saved = self.last_state()
            logger.error(
                "training %s at %s (%s). %s", "stopped" if status == "KILLED" else "failed", where, e,
                f"The last saved state is {saved}: the same command resumes from it, into the same MLflow run"
                if saved else "No training state was saved yet: the same command starts afresh",
            )
        raise e
