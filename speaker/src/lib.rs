//! Placeholder until the speaker lands; see issue "speaker data plane".
