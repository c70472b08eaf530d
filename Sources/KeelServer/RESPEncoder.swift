// Replies on the wire: RESP2 (the default) or RESP3 (after HELLO 3).

import KeelKV
import NIOCore

extension ByteBuffer {
    /// A simple string or error on one line (CR and LF become spaces, as Redis does).
    static func oneLine(_ text: String) -> String {
        // (Checked on the bytes: walking Characters costs grapheme breaking on every reply.)
        text.utf8.contains(where: { $0 == 13 || $0 == 10 })
            ? String(text.map { $0 == "\r" || $0 == "\n" || $0 == "\r\n" ? " " : $0 }) : text
    }

    /// The line that opens an array of `count` items, or a map of `count` pairs (a flat array of
    /// twice as many items in RESP2).
    mutating func writeAggregateHeader(_ count: Int, map: Bool, protocol version: Int) {
        if map && version >= 3 {
            writeStaticString("%")
            writeString(String(count))
        } else {
            writeStaticString("*")
            writeString(String(map ? count * 2 : count))
        }
        writeStaticString("\r\n")
    }

    /// Writes a reply in protocol version 2 or 3.
    mutating func writeReply(_ reply: Reply, protocol version: Int) {
        switch reply {
        case .simple(let text):
            writeStaticString("+")
            writeString(Self.oneLine(text))
            writeStaticString("\r\n")
        case .error(let text):
            // Errors may echo what a client sent: a line break there would forge replies.
            writeStaticString("-")
            writeString(Self.oneLine(text))
            writeStaticString("\r\n")
        case .integer(let value):
            writeStaticString(":")
            writeString(String(value))
            writeStaticString("\r\n")
        case .bulk(let bytes):
            guard let bytes else {
                if version >= 3 { writeStaticString("_\r\n") } else { writeStaticString("$-1\r\n") }
                return
            }
            writeStaticString("$")
            writeString(String(bytes.count))
            writeStaticString("\r\n")
            writeBytes(bytes)
            writeStaticString("\r\n")
        case .array(let items):
            guard let items else {
                if version >= 3 { writeStaticString("_\r\n") } else { writeStaticString("*-1\r\n") }
                return
            }
            writeStaticString("*")
            writeString(String(items.count))
            writeStaticString("\r\n")
            for item in items { writeReply(item, protocol: version) }
        case .double(let value):
            if version >= 3 {
                writeStaticString(",")
                writeString(value.isInfinite ? (value < 0 ? "-inf" : "inf") : formatFloat(value))
                writeStaticString("\r\n")
            } else {
                writeReply(.bulk(formatFloat(value)), protocol: version)
            }
        case .map(let pairs):
            if version >= 3 {
                writeStaticString("%")
                writeString(String(pairs.count))
                writeStaticString("\r\n")
            } else {
                writeStaticString("*")
                writeString(String(pairs.count * 2))
                writeStaticString("\r\n")
            }
            for (key, value) in pairs {
                writeReply(key, protocol: version)
                writeReply(value, protocol: version)
            }
        }
    }
}
