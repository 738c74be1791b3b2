// Package backup is the root KMS backup file format
// (cairn.rootkms.backup.v1.Backup): a cluster's committed state, as its Raft
// state machine persists it, with where it was read (genesis, Raft index and
// term, leader, time, who asked), authenticated by a tag under a key derived
// from the root master key (RMK).
//
// The root KMS writes backups (Seal) and restores them (Open, which checks
// the tag before anything in the contents is trusted); regionctl stores them
// and summarizes them (Inspect) without being able to check the tag: it does
// not hold the RMK. The package is pure: no gRPC, no Raft.
package backup

import (
	"bytes"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	backupv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/backup/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// FormatVersion is the backup format this package writes and reads.
const FormatVersion = 1

// MaxSize bounds a backup file: it travels in one message of the root KMS
// API (16 MiB), with room to spare for the rest of the message. A root KMS
// state is far smaller (a region key version is well under 1 KiB).
const MaxSize = 15 << 20

// tagLabel is prefixed to the contents to form the tagged message; its
// version is the format's, so a file whose format_version was edited does
// not verify.
const tagLabel = "cairn/rootkms/backup/v1\x00"

// Errors of Parse, Open and Seal; branch on them with errors.Is.
var (
	// ErrFormat: the bytes are not a backup file this package reads (too
	// large, undecodable, another format version, required fields missing).
	ErrFormat = errors.New("backup: not a valid backup file")
	// ErrLineage: the backup is of another RMK lineage (genesis id or RMK
	// key check value) than the one asked for.
	ErrLineage = errors.New("backup: of another root key lineage")
)

// Key makes and checks backup tags; rootkey.Key is one. CheckBackupTag
// compares in constant time and fails for a tag it did not make.
type Key interface {
	BackupTag(msg []byte) ([]byte, error)
	CheckBackupTag(msg, tag []byte) error
}

// Seal encodes c (deterministically) and tags it with key: the backup
// file's bytes. c must name its lineage and hold a snapshot.
func Seal(c *backupv1.BackupContents, key Key) ([]byte, error) {
	if err := checkContents(c); err != nil {
		return nil, err
	}
	contents, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("backup: encoding contents: %w", err)
	}
	tag, err := key.BackupTag(tagged(contents))
	if err != nil {
		return nil, fmt.Errorf("backup: tagging: %w", err)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(&backupv1.Backup{FormatVersion: FormatVersion, Contents: contents, Tag: tag})
	if err != nil {
		return nil, fmt.Errorf("backup: encoding: %w", err)
	}
	if len(b) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than the %d a backup may hold", ErrFormat, len(b), MaxSize)
	}
	return b, nil
}

// File is a parsed backup file whose tag has not been checked: its
// contents are for display only until Open checks them.
type File struct {
	// Contents are the file's contents, unverified.
	Contents *backupv1.BackupContents
	raw, tag []byte
}

// Inspect parses a backup file without checking its tag: for a summary
// (regionctl, which does not hold the RMK). Nothing in it may be trusted.
func Inspect(b []byte) (*File, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrFormat, len(b), MaxSize)
	}
	var f backupv1.Backup
	if err := proto.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%w: does not decode", ErrFormat)
	}
	if v := f.GetFormatVersion(); v != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d; this binary reads %d", ErrFormat, v, FormatVersion)
	}
	if len(f.GetTag()) == 0 {
		return nil, fmt.Errorf("%w: no tag", ErrFormat)
	}
	var c backupv1.BackupContents
	if err := proto.Unmarshal(f.GetContents(), &c); err != nil {
		return nil, fmt.Errorf("%w: contents do not decode", ErrFormat)
	}
	if err := checkContents(&c); err != nil {
		return nil, err
	}
	return &File{Contents: &c, raw: f.GetContents(), tag: f.GetTag()}, nil
}

// Open parses a backup file and checks it for the lineage genesisID and
// rmkKCV: the lineage first (ErrLineage, naming both, so that a backup of
// another cluster is told apart from a tampered one), then the tag with key
// (its error, e.g. rootkey.ErrBackupTag). Only then are the contents
// returned.
func Open(b []byte, genesisID string, rmkKCV []byte, key Key) (*backupv1.BackupContents, error) {
	f, err := Inspect(b)
	if err != nil {
		return nil, err
	}
	c := f.Contents
	if c.GetGenesisId() != genesisID || !bytes.Equal(c.GetRmkKcv(), rmkKCV) {
		return nil, fmt.Errorf("%w: the backup is of genesis %s (RMK KCV %x); this cluster is genesis %s (RMK KCV %x)",
			ErrLineage, c.GetGenesisId(), c.GetRmkKcv(), genesisID, rmkKCV)
	}
	if err := key.CheckBackupTag(tagged(f.raw), f.tag); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	return c, nil
}

// Snapshot decodes c's state machine snapshot (for counts and display; the
// root KMS's state machine validates it when it restores it).
func Snapshot(c *backupv1.BackupContents) (*statev1.Snapshot, error) {
	var s statev1.Snapshot
	if err := proto.Unmarshal(c.GetSnapshot(), &s); err != nil {
		return nil, fmt.Errorf("%w: the snapshot does not decode", ErrFormat)
	}
	return &s, nil
}

// tagged is the message a tag covers: the label, then the contents.
func tagged(contents []byte) []byte {
	return append([]byte(tagLabel), contents...)
}

func checkContents(c *backupv1.BackupContents) error {
	switch {
	case c.GetGenesisId() == "" || len(c.GetRmkKcv()) == 0:
		return fmt.Errorf("%w: no genesis id or RMK KCV", ErrFormat)
	case len(c.GetSnapshot()) == 0:
		return fmt.Errorf("%w: no snapshot", ErrFormat)
	case c.GetCreatedAt() == nil:
		return fmt.Errorf("%w: no creation time", ErrFormat)
	}
	return nil
}
