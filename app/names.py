"""Resource names, one rule per kind, always matched in full.

A name becomes a directory on the volume (repos), part of a URL (every resource) and a key in a table, so it is
checked with `fullmatch`: `re.match(r"^...$")` also accepts "name\\n", because `$` matches before a final newline.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class NameRule:
    pattern: str  # a regular expression without anchors: it is always matched in full
    rule: str  # the rule in words, for the error message

    def check(self, name: str) -> str:
        """The name unchanged, or ValueError saying the rule."""
        if re.fullmatch(self.pattern, name) is None:
            raise ValueError(self.rule)
        return name

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


# Datasets and adapter repositories. The repository's name is a directory on the volume and the column holding it
# is 100 characters wide.
NAME = NameRule(
    r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,99}",
    "letters, digits, '.', '_' and '-' only, starting with a letter or digit, at most 100",
)
# Deployments: a DNS label (lowercase, at most 63), so that a deployment's name can name hosts and apps as well as
# its replicas (`name-r1`) and its endpoint.
DEPLOYMENT_NAME = NameRule(
    r"[a-z0-9][a-z0-9-]{0,62}",
    "lowercase letters, digits and dashes, starting with a letter or digit, at most 63",
)
# "repo/3" (a version of a repository) or "repo/3@2" (its checkpoint 2).
VERSION_REF = re.compile(rf"(?P<repo>{NAME.pattern})/(?P<version>[0-9]{{1,9}})(?:@(?P<checkpoint>[0-9]{{1,9}}))?")
MAX_NUMBER = 10**9 - 1  # the largest version or checkpoint number: nine digits, as VERSION_REF reads them
