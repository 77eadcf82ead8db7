"""Model of the prefill/decode cluster (MODEL.md §1): scenarios, parameters, calibration."""

from .config import list_scenarios, load_scenario, scenario_from_dict
from .params import ModelParams, Rates, RateSchedule, Spec, service_rates
from .scenario import PRICING_SCHEMES, ArrivalSchedule, Cluster, IterationTime, JobClasses, Pricing, Scenario

__all__ = [
    "PRICING_SCHEMES", "ArrivalSchedule", "Cluster", "IterationTime", "JobClasses", "ModelParams", "Pricing",
    "RateSchedule", "Rates", "Scenario", "Spec", "list_scenarios", "load_scenario", "scenario_from_dict", "service_rates",
]
