"""tianshou 2.x: an ``Experiment`` that keeps its policy and checkpoints in a bucketsnap run, and resumes from it.

tianshou's ``Experiment.create_experiment_world`` builds its ``PolicyPersistence`` itself, by looking the name up
in ``tianshou.highlevel.experiment``, and takes no argument to supply another. :class:`RunExperiment` substitutes
:class:`bucketsnap.persistence.PolicyPersistence`, bound to the run's URL, for the duration of that one call (under
a lock, so two experiments built at once in one process do not see each other's run). The trade-off: it depends on
that name staying where tianshou 2.x has it; the tests run against the real package and fail if it moves.

Everything else stays tianshou's: the config (``policy_persistence_mode``, ``policy_restore_directory`` given as
a run URL), the factories, the trainer, and ``persistence_base_dir`` on local disk, which keeps tianshou's log file,
tensorboard events and ``experiment.pkl`` (without ``storage_options``, which may hold credentials).

On top of tianshou's behaviour:

* off-policy trainers get the ``save_checkpoint_fn`` tianshou gives only on-policy ones, so every algorithm's
  checkpoints reach the run (tianshou's logger calls it every ``save_interval`` epochs:
  ``LoggerFactoryDefault(save_interval=1)``);
* ``resume=True`` loads the newest checkpoint (weights and optimizer state, without pickle) into the algorithm and
  lets the trainer continue from its epoch, env step and gradient step (tianshou's ``resume_from_log``), read from
  the run rather than from tensorboard files that a preempted VM took with it. The replay buffer is not kept.
"""

from __future__ import annotations

import threading
from typing import Any

try:
    import tianshou.highlevel.experiment as _experiment
    from tianshou.highlevel.experiment import Experiment
    from tianshou.highlevel.world import World
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bucketsnap.integrations.tianshou needs tianshou 2.x: pip install 'tianshou[eval]'") from exc

from bucketsnap.persistence import PolicyPersistence

__all__ = ["RunExperiment", "keep_in_run"]

#: The name tianshou's ``create_experiment_world`` looks its persistence class up by, in its own module.
_NAME = "PolicyPersistence"
#: Held while that name is bucketsnap's.
_SUBSTITUTING = threading.Lock()


class RunExperiment(Experiment):
    """A tianshou ``Experiment`` whose policy persistence is bucketsnap's, committing to the run at ``run``.

    Build it with :func:`keep_in_run` from the experiment an ``ExperimentBuilder`` made; the other arguments are
    ``Experiment``'s own.

    Args:
        run: the run's URL (``s3://bucket/runs/cartpole``, ``memory://...``, a local path).
        storage_options: passed to fsspec; not pickled into ``experiment.pkl``.
        resume: continue from the run's newest checkpoint, if it has one (a restarted, preempted job).
    """

    def __init__(
        self,
        *args: Any,
        run: str,
        storage_options: dict[str, Any] | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.run_url = run
        self.storage_options = storage_options
        self.resume = resume

    @classmethod
    def from_directory(
        cls, directory: str, restore_policy: bool = True, *, storage_options: dict[str, Any] | None = None
    ) -> Experiment:
        """tianshou's ``Experiment.from_directory``; restoring the policy reads it from the run, not ``directory``.

        Args:
            directory: the persistence directory holding ``experiment.pkl``.
            restore_policy: set ``policy_restore_directory`` to the run's URL.
            storage_options: the run's, which ``experiment.pkl`` does not hold.
        """
        experiment = super().from_directory(directory, restore_policy)
        if isinstance(experiment, RunExperiment):
            experiment.storage_options = storage_options
            if restore_policy:
                experiment.config.policy_restore_directory = experiment.run_url
        return experiment

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "storage_options": None}  # credentials stay out of experiment.pkl

    def _tostring_excludes(self) -> list[str]:
        return [*super()._tostring_excludes(), "storage_options"]  # nor in tianshou's log

    def create_experiment_world(
        self,
        override_experiment_name: str | None = None,
        logger_run_id: str | None = None,
        raise_error_on_dirname_collision: bool = True,
        reset_collectors: bool = True,
    ) -> World:
        """tianshou's world, with bucketsnap's persistence in the trainer and the checkpoint restored if resuming."""
        made: list[PolicyPersistence] = []

        def policy_persistence(additional: Any = None, enabled: bool = True, mode: Any = None) -> PolicyPersistence:
            persistence = PolicyPersistence(
                additional,
                enabled,
                mode if mode is not None else PolicyPersistence.Mode.POLICY,
                location=self.run_url,
                storage_options=self.storage_options,
            )
            made.append(persistence)
            return persistence

        with _SUBSTITUTING:
            theirs = vars(_experiment)[_NAME]
            setattr(_experiment, _NAME, policy_persistence)
            try:
                world = super().create_experiment_world(
                    override_experiment_name, logger_run_id, raise_error_on_dirname_collision, reset_collectors
                )
            finally:
                setattr(_experiment, _NAME, theirs)
        if len(made) != 1:
            raise RuntimeError(
                f"tianshou's create_experiment_world built {len(made)} policy persistences, not one: this tianshou "
                "is not the 2.x that bucketsnap.integrations.tianshou supports (pip install 'tianshou[eval]>=2,<3')"
            )
        self._attach(world, made[0])
        return world

    def _attach(self, world: World, persistence: PolicyPersistence) -> None:
        trainer = world.trainer
        if trainer is None:
            return
        if trainer.params.save_checkpoint_fn is None:  # tianshou gives one to on-policy trainers only
            trainer.params.save_checkpoint_fn = persistence.get_save_checkpoint_fn(world)
        if not self.resume:
            return
        counters = persistence.restore_checkpoint(world.algorithm, world, self.config.device)
        if counters is None:
            return  # a first start: nothing to resume
        trainer.params.resume_from_log = True
        resumed = (counters["epoch"], counters["env_step"], counters["gradient_step"])
        # The trainer asks its logger where to resume (tianshou's resume_from_log); the answer is the run's.
        setattr(world.logger, "restore_data", lambda: resumed)  # noqa: B010
        if hasattr(world.logger, "last_save_step"):
            world.logger.last_save_step = resumed[0]


def keep_in_run(
    experiment: Experiment,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    resume: bool = False,
) -> RunExperiment:
    """The same experiment, keeping its policy and checkpoints in the bucketsnap run at ``url``.

    Args:
        experiment: what ``ExperimentBuilder.build()`` returned.
        url: the run's URL.
        storage_options: passed to fsspec.
        resume: continue from the run's newest checkpoint, if any (restart the same script after preemption).
    """
    return RunExperiment(
        experiment.config,
        experiment.env_factory,
        experiment.algorithm_factory,
        experiment.training_config,
        experiment.name,
        experiment.logger_factory,
        run=url,
        storage_options=storage_options,
        resume=resume,
    )
