"""Site-side differential privacy: persistent accountant, site policy, Opacus wiring."""

from .accountant import ACCOUNTANT_FILE, PersistentAccountant, epsilon_of
from .policy import PolicyRefusal, SitePolicy, read_policy_file, write_policy_file

__all__ = [
    "ACCOUNTANT_FILE",
    "PersistentAccountant",
    "PolicyRefusal",
    "SitePolicy",
    "epsilon_of",
    "read_policy_file",
    "write_policy_file",
]
