-- Read state: per (user, room), the offset (in the room's Kafka partition) up to which the user has
-- read; -1 is before the partition's first record. Written in batches by the persister's reads
-- consumer from the compacted topic chat.reads, only ever forward (GREATEST). The primary key
-- serves the one read: a user's rooms, when Redis has not got them.
CREATE TABLE IF NOT EXISTS read_marks (
  user_id VARCHAR(255) NOT NULL,
  room VARCHAR(64) CHARACTER SET ascii NOT NULL,
  read_offset BIGINT NOT NULL,
  updated_at BIGINT NOT NULL,
  PRIMARY KEY (user_id, room)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
