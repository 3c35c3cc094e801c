// Generated from gateway/protocol.py (Close); do not edit: tests/unit/gateway/test_close_codes.py
// holds it equal to the server's codes and prints the new text when they change.
export const Close = Object.freeze({
  NORMAL: 1000,
  BAD_TOKEN: 1008,
  TOO_LARGE: 1009,
  DRAINING: 1012,
  TRY_AGAIN_LATER: 1013,
  TOO_SLOW: 4008,
});
