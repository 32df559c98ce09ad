"""Reports about mail authentication: reading the ones others send us, making our own.

Owns: DMARC aggregate reports (RFC 7489 section 7.2) and SMTP TLS reports (RFC 8460), both
ways. Reading (``palisade dmarc report``, ``palisade tlsrpt report``): :mod:`.sources` turns
files, archives and report mails into report documents, bounded in size; :mod:`.safexml` parses
XML without a DTD; :mod:`.dmarc_aggregate` and :mod:`.tlsrpt` parse and summarise. Making our
own (``send-reports``): :mod:`.dmarc_records` (the per-message evaluation lines the gateway
appends), :mod:`.dmarc_send` and :mod:`.tlsrpt_send` (a finished day into report mails),
:mod:`.mailout` (the report mail, its destinations, signing and queueing).
Must not touch: the SMTP conversation; it queues mail only through ``palisade.spool``.
Trust: every report read comes from the network (any sender may mail a rua address): sizes are
bounded before decompression finishes, XML with a DTD is refused, every value is checked for its
type and cleaned before it reaches the terminal.
"""
