// The one error type of the offline tools: a message for the operator, already worded as the line to
// print after "qnbd: ".

public struct ToolError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { message }
}
