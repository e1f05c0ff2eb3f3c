"""fedfusion's Flower ServerApp (Message API): ``app`` (pyproject: ``server.server_app:app``).

One run: read the run config, build the strategy chain (:mod:`server.strategy`), start from a fresh model, from
``init-checkpoint`` (:mod:`server.initial`), or resume from ``RUN/checkpoints/last.pt``, ask the sites to prepare
(``prepare-sites``, :mod:`server.prepare`), and let Flower's ``Strategy.start`` run the remaining rounds. After each
round the ``evaluate_fn`` hook evaluates the global model (its moving average with ``server-ema``) on the held-out
set (every ``eval-every`` rounds on the ``eval-subsets`` modality subsets, and after the last on every subset),
chooses ``best.pt`` on the selection set, logs metrics, prints the compact table, and writes ``last.pt`` (and
``best.pt``) atomically. That work runs on one background thread, in round order, while the sites train the next
round (nothing the sites receive depends on it); the last round's waits for every earlier one.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import runconfig, timings
from common.layout import HELDOUT_NAME, UNSEEN_NAME, VALIDATION_NAME, resolve_cohort_dir, resolve_test_dir
from models.config import ModelConfig
from models.metrics import DEFAULT_THRESHOLD
from models.modalities import subset_name, subsets as all_subsets
from models.runlog import MetricsLog

from .checkpointing import BestTracker, RunDirectory
from .console import COLUMNS, print_round, render
from .ema import WeightAverage
from .evaluation import GlobalEvaluator, subset_mean
from .grid import prompt
from .prepare import prepare_sites
from .initial import initial_state
from .settings import ServerSettings
from .strategy import FederationExhausted, build_strategy

logger = logging.getLogger(__name__)

def _server_logging(run_dir: Path) -> logging.Handler:
    """Send the ``server`` loggers to ``RUN/server.log`` (and to stderr when nothing else is configured)."""
    pkg = logging.getLogger("server")
    pkg.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in pkg.handlers
    ):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(stream)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "server.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(handler)
    return handler


def run_server(grid: Grid, context: Context) -> None:
    """The ServerApp's main: run (or resume) a federation described by ``context.run_config``."""
    run_config = runconfig.validate(context.run_config)
    settings = ServerSettings.from_run_config(run_config)
    settings.check_protection()  # refuse before anything is written
    model_config = runconfig.model_config(run_config)
    run_dir = RunDirectory(settings.resume or settings.run_dir)
    handler = _server_logging(run_dir.path)
    try:
        # Flower's deployed grid polls for replies every 3 s: up to 6 s of idle wait per round
        _run(prompt(grid), settings, model_config, run_config, run_dir)
    finally:
        logging.getLogger("server").removeHandler(handler)
        handler.close()


def _run(
    grid: Grid,
    settings: ServerSettings,
    model_config: ModelConfig,
    run_config: dict[str, Any],
    run_dir: RunDirectory,
) -> None:
    mlog = MetricsLog(run_dir.metrics)
    start_round = 0
    best = BestTracker(settings.best_metric)
    strategy_state: Mapping[str, Any] = {}
    # server-ema: the evaluated (and best.pt) model is a moving average of the global ones (post-processing)
    ema = WeightAverage(settings.server_ema) if settings.server_ema > 0 else None
    if settings.resume:
        state = run_dir.load_resume()
        if state.model_config != model_config:
            logger.warning(
                "resume: the run config's model differs from the checkpoint's; continuing with the checkpoint's "
                "model config %s", state.model_config.to_dict(),
            )
            model_config = state.model_config
        start_round = state.round
        arrays = ArrayRecord({k: v for k, v in state.state_dict.items()})
        strategy_state = state.strategy_state
        best = BestTracker(settings.best_metric, state.best)
        if ema is not None:
            ema.load_state_dict(state.ema)
        if settings.init_checkpoint:
            logger.info("resume: init-checkpoint is ignored, the run continues from its own last.pt")
        # Entries of an interrupted round (> start_round) would otherwise be logged twice.
        mlog.drop_rounds_after(start_round)
        logger.info("resuming %s after round %d of %d", run_dir.path, start_round, settings.num_server_rounds)
    else:
        if run_dir.metrics.exists() and run_dir.metrics.stat().st_size:
            logger.warning("fresh run in %s: its previous metrics log is cleared", run_dir.path)
            mlog.drop_rounds_after(-1)
        initial = initial_state(model_config, settings.seed, settings.init_checkpoint, run_dir.path)
        arrays = ArrayRecord(initial)
        if ema is not None:
            ema.update(initial)
    resolved = {**run_config, **runconfig.model_entries(model_config)}
    run_dir.write_config(resolved)

    remaining = settings.num_server_rounds - start_round
    if remaining <= 0:
        logger.info("run %s already completed %d rounds; nothing to do", run_dir.path, start_round)
        return

    strategy = build_strategy(settings, model_config.modalities, mlog, round_offset=start_round)
    if strategy_state:
        strategy.set_state(strategy_state)

    def cohort(folder: Path, **options: Any) -> GlobalEvaluator:
        return GlobalEvaluator(model_config, folder, device=settings.device, batch_size=settings.eval_batch_size,
                               **options)

    evaluator = cohort(resolve_test_dir(settings.test_dir, settings.data_dir), hd95=settings.eval_hd95)
    # best.pt is chosen on the selection set, never on the set the reported numbers come from (when there is one)
    select_dir = resolve_cohort_dir(settings.select_dir, settings.data_dir, VALIDATION_NAME)
    selector = cohort(select_dir, hd95="none") if select_dir else None
    if selector is None:
        logger.warning("no model-selection set (%s/ or run config select-dir): best.pt is chosen on the held-out "
                       "set the numbers are reported on, so they are optimistic", VALIDATION_NAME)
    from common.evaluation import select_subsets  # the held-out readers: imported when the server runs

    # best-metric's default (subset-mean/...) averages over these: a model chosen on the full set alone can be the
    # one that has not yet learnt the modalities a site's patients lack
    select_names = [subset_name(s) for s in select_subsets(settings.select_subsets, model_config.modalities)
                    or all_subsets(model_config.modalities)]
    unseen_dir = resolve_cohort_dir(settings.unseen_dir, settings.data_dir, UNSEEN_NAME)
    # the full modality set only: the unseen cohort answers "does the model transfer to a new scanner" (the report's
    # ratio to the in-distribution full set); its 63 subsets cost the demo's last round 25 s and answered nothing
    unseen = cohort(unseen_dir, subsets=[model_config.modalities], hd95="none") if unseen_dir else None

    def after_round(local_round: int, state_dict: dict[str, Any],
                    strategy_state: Mapping[str, Any] | None) -> MetricRecord | None:
        """After every round (and with 0 before the first): evaluate, log, checkpoint. Runs on the evaluation
        thread, one round at a time in order; ``state_dict`` (what the sites train from next round) and
        ``strategy_state`` were taken when the round ended, since the strategy is running the next one by now."""
        if local_round == 0 and (start_round > 0 or not settings.init_checkpoint):
            # a resumed run evaluated its round 0 before the stop; weights fresh from the seed tell nothing
            return None
        rnd = start_round + local_round
        # round 0 of a run from init-checkpoint: the distributed starting point (e.g. public pretraining),
        # evaluated so the report shows what the federation added to it; best.pt may be it, last.pt is not written
        baseline = local_round == 0
        evaluated = ema.update(state_dict) if ema is not None and not baseline else state_dict
        flat: dict[str, float] | None = None
        due = (settings.eval_every > 0 and rnd % settings.eval_every == 0) or rnd == settings.num_server_rounds
        # The selection set goes first: it chooses best.pt and the classifier's operating point (the threshold
        # maximising balanced accuracy there), which the reported held-out numbers are then computed at. Without a
        # selection set the threshold stays at the default: tuning it on the reporting set would flatter it.
        selection: dict[str, float] | None = None
        threshold: float | None = None
        if due and selector is not None:
            with timings.phase("server", "server-eval", round=rnd, cohort="selection"):
                chosen = selector.evaluate(evaluated, subsets=settings.select_subsets)
            if chosen is not None:
                selection = {**chosen.flat, **(subset_mean(chosen.flat, select_names) or {})}
                threshold = chosen.operating_threshold
                mlog.write(rnd, "server-select", "global", selection)
        at = DEFAULT_THRESHOLD if threshold is None else threshold
        if due:
            # every modality subset at the last round; before it, the cheaper eval-subsets (63 subsets of 6
            # modalities cost as much CPU as half the sites' training of a round)
            subsets = None if rnd == settings.num_server_rounds else settings.eval_subsets
            with timings.phase("server", "server-eval", round=rnd, cohort="held-out"):
                outcome = evaluator.evaluate(evaluated, subsets=subsets, threshold=at)
            if outcome is not None:
                flat = outcome.flat
                mlog.write(rnd, "server-eval", "global", flat)
                logger.info("round %d global evaluation per modality subset:\n%s", rnd, render(outcome.table))
                print_round(rnd, flat)
        if selector is None and flat is not None:
            # no selection set: best.pt is chosen on the reporting set, by the same subsets' mean (evaluated again
            # only where this round's eval-subsets lack one of them)
            mean = subset_mean(flat, select_names)
            if mean is None:
                again = evaluator.evaluate(evaluated, subsets=settings.select_subsets, threshold=at)
                mean = None if again is None else subset_mean(again.flat, select_names)
            selection = {**flat, **(mean or {})}
        if selection is not None and best.update(rnd, selection):
            run_dir.save_best(rnd, evaluated, model_config, metric=settings.best_metric,
                              value=float(best.value or 0.0), run_config=resolved,
                              selected_on=VALIDATION_NAME if selector is not None else HELDOUT_NAME,
                              threshold=threshold)
            logger.info("round %d: new best %s = %.4f", rnd, best.key, best.value)
        if unseen is not None and rnd == settings.num_server_rounds:
            with timings.phase("server", "server-eval", round=rnd, cohort="unseen"):
                other = unseen.evaluate(evaluated, threshold=at)
            if other is not None:
                mlog.write(rnd, "server-eval-unseen", "global", other.flat)
                logger.info("round %d unseen-scanner cohort per modality subset:\n%s", rnd, render(other.table))
        if not baseline:
            # last.pt goes last: once it names round r, everything of round r is on disk.
            started = timings.clock()
            run_dir.save_round(
                rnd, state_dict, model_config,
                strategy_state=dict(strategy_state or {}), run_config=resolved, best=best.state(),
                ema=ema.state_dict() if ema is not None else None,
                # the threshold belongs to the evaluated model: with EMA the average, not last.pt's raw weights
                threshold=threshold if ema is None else None,
            )
            timings.done(started, "server", "checkpoint", round=rnd)
            logger.info("round %d of %d complete; checkpoint %s", rnd, settings.num_server_rounds, run_dir.last)
        if flat is None:
            return None
        return MetricRecord({key: flat[key] for _, key in COLUMNS if key in flat})

    # The server's evaluation of round r (and round 0's, the distributed start, while the sites prepare) runs on
    # one thread while the strategy sends round r+1: the sites train from round r's weights whatever it finds. A
    # deployed server's CPU is otherwise idle while its sites train; on one machine whose sites fill the cores it
    # is a tie (docs/server.md, "Evaluation beside the next round"). At most one round's evaluation is in flight:
    # round r+1's waits for round r's, so evaluations, best.pt, the EMA and last.pt stay in round order, last.pt
    # lags the training by at most one round (what a crash can cost) and no backlog of weights builds up when the
    # evaluation is slower than a round.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-evaluation")
    pending: list[Future[MetricRecord | None]] = []

    def finish_pending() -> None:
        while pending:
            pending.pop(0).result()  # an evaluation that raised stops the run here, as it did when run inline

    try:
        round_0 = pool.submit(after_round, 0, arrays.to_torch_state_dict(), None)

        def evaluate_fn(local_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
            # Strategy.start evaluates its initial arrays (these) as round 0 first: that result is round_0's
            if local_round == 0:
                return round_0.result()
            finish_pending()
            # copies taken now: the strategy's state moves on with the next round while this one is evaluated
            job = pool.submit(after_round, local_round, round_arrays.to_torch_state_dict(),
                              copy.deepcopy(strategy.get_state()))
            if local_round < remaining:
                pending.append(job)
                return None  # Flower's history keeps None for it; metrics.jsonl has the round's numbers
            return job.result()

        if settings.prepare_sites:
            prepared = prepare_sites(grid, settings.min_available_nodes, settings.round_timeout)
            strategy.without_validation |= prepared.cannot_evaluate
        train_config = ConfigRecord()  # sites read the run config themselves; Flower adds "server-round"
        try:
            strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=remaining,
                timeout=settings.round_timeout,
                train_config=train_config,
                evaluate_config=ConfigRecord(),
                evaluate_fn=evaluate_fn,
            )
        except FederationExhausted as exc:
            logger.warning("stopping the federation early: %s; the last checkpoint stays valid", exc)
    finally:
        pool.shutdown(wait=True)  # a stopped or failed run still lets the evaluations under way finish writing
    finish_pending()  # an evaluation that failed after the last round boundary still fails the run


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_server(grid, context)
