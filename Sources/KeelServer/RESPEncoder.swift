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
            writeNumberLine(UInt8(ascii: "%"), Int64(count))
        } else {
            writeNumberLine(UInt8(ascii: "*"), Int64(map ? count * 2 : count))
        }
    }

    /// `prefix`, `value` in decimal and CR LF, as one write (an integer reply, or the line that
    /// opens a bulk string or an aggregate): no String in between, one capacity check.
    mutating func writeNumberLine(_ prefix: UInt8, _ value: Int64) {
        // Filled from the end: CR LF, the digits, a minus sign, the prefix (23 bytes at most).
        var scratch: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        withUnsafeMutableBytes(of: &scratch) { line in
            var start = line.count - 2
            line[start] = 13
            line[start + 1] = 10
            var magnitude = value.magnitude
            repeat {
                start -= 1
                line[start] = UInt8(truncatingIfNeeded: 48 + magnitude % 10)
                magnitude /= 10
            } while magnitude > 0
            if value < 0 {
                start -= 1
                line[start] = UInt8(ascii: "-")
            }
            start -= 1
            line[start] = prefix
            writeBytes(UnsafeRawBufferPointer(rebasing: line[start...]))
        }
    }

    /// Writes a reply in protocol version 2 or 3.
    mutating func writeReply(_ reply: Reply, protocol version: Int) {
        switch reply {
        case .simple(let text):
            // Nearly every write's reply.
            if text == "OK" {
                writeStaticString("+OK\r\n")
                return
            }
            writeStaticString("+")
            writeString(Self.oneLine(text))
            writeStaticString("\r\n")
        case .error(let text):
            // Errors may echo what a client sent: a line break there would forge replies.
            writeStaticString("-")
            writeString(Self.oneLine(text))
            writeStaticString("\r\n")
        case .integer(let value):
            writeNumberLine(UInt8(ascii: ":"), value)
        case .bulk(let bytes):
            guard let bytes else {
                if version >= 3 { writeStaticString("_\r\n") } else { writeStaticString("$-1\r\n") }
                return
            }
            writeNumberLine(UInt8(ascii: "$"), Int64(bytes.count))
            writeBytes(bytes)
            writeStaticString("\r\n")
        case .array(let items):
            guard let items else {
                if version >= 3 { writeStaticString("_\r\n") } else { writeStaticString("*-1\r\n") }
                return
            }
            writeNumberLine(UInt8(ascii: "*"), Int64(items.count))
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
            writeAggregateHeader(pairs.count, map: true, protocol: version)
            for (key, value) in pairs {
                writeReply(key, protocol: version)
                writeReply(value, protocol: version)
            }
        }
    }
}
