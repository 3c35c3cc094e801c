-- Edits and deletes (docs/protocol.md). They are rows of `messages` too (kind 1 edit, 2 delete),
-- at their own position in the room, naming their message (target_id at target_offset): a resume
-- replays them in order with the messages. A message row holds its current state: its last edit's
-- time (edited_ts) and offset (rev: the newer state wins when two copies meet, see
-- shared/store/archive.py), or deleted = 1 with body, user and client_msg_id blanked (a tombstone
-- keeps the position). ix_messages_target finds a deleted message's edits, to blank them too.
ALTER TABLE messages
  ADD COLUMN kind TINYINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN target_id CHAR(26) CHARACTER SET ascii NULL,
  ADD COLUMN target_offset BIGINT NULL,
  ADD COLUMN edited_ts BIGINT NULL,
  ADD COLUMN rev BIGINT NOT NULL DEFAULT -1,
  ADD COLUMN deleted TINYINT UNSIGNED NOT NULL DEFAULT 0,
  ADD KEY ix_messages_target (target_id);
