"""Domain packages: what is specific to one kind of image, kept out of the generic code.

The generic packages (:mod:`diffmask.data`, :mod:`diffmask.prompts`, :mod:`diffmask.labels`, the
stages) take everything they know about a dataset from its config (``conf/data/<name>.yaml``:
class names, channels, prompt, ...). Code that only makes sense for one domain lives here, one
package per domain, and only that domain's datasets and features import it:

* :mod:`diffmask.domains.chest` — chest X-rays (JSRT/SCR, the phantom, CTR findings, film markers).
"""

__all__: list[str] = []
