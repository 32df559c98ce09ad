"""Feedback: what refusals and other programs' logs teach the gateway and the firewall.

Owns: who is never blocked (:mod:`.protect`), and recording incidents into the state store with
the block policy and that protection (:mod:`.incidents`). The store itself (events, windows,
blocks) is the ``StateStore`` port's; reading logs (``palisade scan``) and the firewall
(``palisade firewall``) build on this package. Imports only ``palisade.ports``,
``palisade.clock`` and ``palisade.obs`` (import-linter layers contract): the composition root
(``palisade.config.feedback``) builds these parts from the config.
"""
