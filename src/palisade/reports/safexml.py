"""XML parsing for network input: no DTD, so no entity expansion (billion laughs, external
entities) whatever the document says.

Owns: :func:`parse`, ElementTree's expat parser with the DOCTYPE and entity declaration hooks
refusing (what ``defusedxml`` does, without the dependency). Aggregate reports never carry a DTD
(the RFC 7489 schema is an XSD), so refusing one loses nothing.
Trust: the bytes are anybody's; only well-formed, DTD-free XML is returned.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from xml.parsers import expat

__all__ = ["UnsafeXml", "XmlError", "local_name", "parse"]


class XmlError(ValueError):
    """The document is not well-formed XML."""


class UnsafeXml(XmlError):
    """The document declares a DTD or an entity: refused before anything is expanded."""


def _refuse(*_args: Any) -> Any:
    raise UnsafeXml("document type declarations and entities are refused")


def parse(data: bytes) -> ET.Element:
    """The root element of ``data``, built by expat with no namespace processing (a tag is
    read with :func:`local_name`). Raises :class:`UnsafeXml` for a DTD or an entity
    declaration, :class:`XmlError` for XML that is not well-formed."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.UnparsedEntityDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
        return builder.close()
    except expat.ExpatError as exc:
        raise XmlError(str(exc)) from None
    except AssertionError:  # TreeBuilder: no root element
        raise XmlError("no root element") from None


def local_name(tag: str) -> str:
    """``{urn:...}feedback`` or ``dmarc:feedback`` -> ``feedback``: namespaced and plain
    documents (RFC 9990's and RFC 7489's) read alike."""
    return tag.rpartition("}")[2].rpartition(":")[2]
