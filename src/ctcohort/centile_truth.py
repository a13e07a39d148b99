"""Known age-dependent distributions of a measure, to check centile charts against (tests, benchmarks).

``normal``: N(mean(age), sd(age)), a mean that rises and bends (like an HU mean) and an SD that grows with age.
``skewed``: gamma with shape 8 (skewness 0.71, coefficient of variation 0.35) whose mean rises and bends with age
(like a volume). ``heavy``: Student's t with HEAVY_DF degrees of freedom (excess kurtosis 6) with the mean and SD of
``normal`` (like an HU mean with outlying scans). Ages of a drawn cohort are uniform in AGES.
"""

from dataclasses import dataclass

import numpy as np
from scipy import stats

AGES = (20.0, 85.0)


def _normal_mean(age):
    return 100 + 0.8 * (age - 50) - 0.015 * (age - 50) ** 2


def _normal_sd(age):
    return 8 + 0.08 * (age - 20)


def _gamma_mean(age):
    return 150 + 1.2 * (age - 50) + 0.02 * (age - 50) ** 2


GAMMA_SHAPE = 8.0
HEAVY_DF = 5.0


@dataclass(frozen=True)
class Truth:
    """A family of scipy distributions indexed by age."""

    name: str

    def distribution(self, age):
        age = np.asarray(age, float)
        if self.name == "normal":
            return stats.norm(_normal_mean(age), _normal_sd(age))
        if self.name == "heavy":
            return stats.t(HEAVY_DF, _normal_mean(age), _normal_sd(age) * np.sqrt((HEAVY_DF - 2) / HEAVY_DF))
        return stats.gamma(GAMMA_SHAPE, scale=_gamma_mean(age) / GAMMA_SHAPE)

    def sample(self, age, rng) -> np.ndarray:
        return self.distribution(age).rvs(random_state=rng)

    def draw(self, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """(ages, values) of n scans."""
        age = rng.uniform(*AGES, n)
        return age, self.sample(age, rng)

    def centile(self, p: float, age) -> np.ndarray:
        return self.distribution(age).ppf(p / 100)

    def sd(self, age) -> np.ndarray:
        return self.distribution(age).std()


TRUTHS = {name: Truth(name) for name in ("normal", "skewed", "heavy")}
