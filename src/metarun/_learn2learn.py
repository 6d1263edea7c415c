"""learn2learn, imported once without the banner that gym prints to stderr.

``import learn2learn`` imports ``learn2learn.gym``, hence gym 0.26.2, whose ``gym_notices``
package prints a deprecation notice to stderr on every import. metarun uses no gym
environment, so the notice is noise on metarun's console; every metarun module imports
learn2learn from here.
"""

import contextlib
import io

with contextlib.redirect_stderr(io.StringIO()):
    import learn2learn as l2l

__all__ = ["l2l"]
