"""fp16 loss scaling: a constant scale, or Megatron's dynamic scaler with hysteresis. bf16 and fp32 need none.

The dynamic scaler halves the scale after ``hysteresis`` overflowing steps (each such step is skipped) and doubles
it after ``growth_interval`` clean steps, so the scale tracks the largest value that does not overflow fp16.
Megatron's semantics to the step: the hysteresis count is restored only when the scale grows, so after the first
``hysteresis`` overflows every further one halves until the next growth; the floor is ``min_scale``.

Checkpoints: the dynamic scale and both counters resume exactly; a constant scale is the command line's
(``--loss-scale``), so a resume with another value (or from a dynamic run) uses the new one, as Megatron's does.
"""
from __future__ import annotations

import torch


class ConstantGradScaler:
    def __init__(self, scale: float):
        self._scale = torch.tensor(float(scale), dtype=torch.float32)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": float(self._scale)}  # for the record: a constant scale loads from the command line

    def load_state_dict(self, state: dict) -> None:
        pass


class DynamicGradScaler(ConstantGradScaler):
    def __init__(self, initial_scale: float = 2.0 ** 16, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        if not 0 < min_scale <= initial_scale or growth_factor <= 1 or not 0 < backoff_factor < 1 \
                or growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"bad dynamic loss-scale settings: initial {initial_scale}, min {min_scale}, growth "
                             f"{growth_factor}, backoff {backoff_factor}, interval {growth_interval}, hysteresis "
                             f"{hysteresis}")
        self.min_scale, self.growth_factor, self.backoff_factor = float(min_scale), growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.clamp(self._scale * self.backoff_factor, min=self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": float(self._scale), "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = torch.tensor(float(state["scale"]), dtype=torch.float32)
        self._growth_tracker = int(state.get("growth_tracker", 0))
        self._hysteresis_tracker = int(state.get("hysteresis_tracker", self.hysteresis))
