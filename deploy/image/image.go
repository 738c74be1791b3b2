// Package image assembles Cairn's container images without a Docker daemon:
// one image per binary, FROM scratch, one reproducible layer (the binary, a
// non-root user, a writable /tmp and home), written as a tarball that
// `docker load`, `podman load` and `crane` read.
//
// Reproducible means the same inputs give the same image digest: every file
// of the layer carries the same fixed time, entries are written sorted by
// path with fixed owners and no user or group names, the layer is gzipped
// with a zero header time, and the config's times are that same fixed time.
package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The user every image runs as: distroless's nonroot, so volume ownership
// and Kubernetes securityContext settings carry over unchanged.
const (
	UID     = 65532
	GID     = 65532
	User    = "65532:65532"
	Home    = "/home/nonroot"
	BinDir  = "/usr/local/bin"
	TmpDir  = "/tmp"
	Source  = "https://github.com/cairnkms/cairn"
	passwd  = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
	group   = "root:x:0:\nnonroot:x:65532:\n"
	creator = "cairn deploy/image (go-containerregistry, no Docker daemon)"
)

// File is one entry of the image's layer.
type File struct {
	// Path is absolute and clean ("/usr/local/bin/kms").
	Path string
	// Mode holds the permission bits and fs.ModeDir or fs.ModeSticky; a
	// regular file has no type bits.
	Mode fs.FileMode
	UID  int
	GID  int
	// Data is a regular file's content.
	Data []byte
}

// Spec describes one image.
type Spec struct {
	// Name is the binary's name: the entrypoint is BinDir/Name.
	Name string
	// Binary is the executable's content.
	Binary []byte
	// Extra files for the layer, e.g. the shared libraries of a cgo binary.
	Extra []File
	// Platform is the image's OS and architecture (OS must be "linux").
	Platform v1.Platform
	// Version goes into the org.opencontainers.image.version label.
	Version string
	// Revision, if set, goes into org.opencontainers.image.revision.
	Revision string
	// Created is every time in the image (layer entries, config, history);
	// it is truncated to seconds. Fix it for a reproducible digest.
	Created time.Time
	// Description, if set, goes into org.opencontainers.image.description.
	Description string
}

// Validate reports what is wrong with s.
func (s Spec) Validate() error {
	switch {
	case s.Name == "" || strings.ContainsAny(s.Name, "/\\ ") || s.Name == "." || s.Name == "..":
		return fmt.Errorf("image: binary name %q is empty or not a plain file name", s.Name)
	case len(s.Binary) == 0:
		return fmt.Errorf("image: %s: the binary is empty", s.Name)
	case s.Platform.OS != "linux" || s.Platform.Architecture == "":
		return fmt.Errorf("image: %s: platform %s/%s: only linux/<arch> images are built", s.Name, s.Platform.OS, s.Platform.Architecture)
	case s.Version == "":
		return fmt.Errorf("image: %s: the version is empty", s.Name)
	}
	for _, f := range s.Extra {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || f.Path == "/" {
			return fmt.Errorf("image: %s: extra file path %q is not absolute and clean", s.Name, f.Path)
		}
	}
	return nil
}

// Entrypoint is the path of the binary in the image of the named binary.
func Entrypoint(name string) string { return path.Join(BinDir, name) }

// Files returns the entries of s's layer, without the parent directories
// Layer adds: the binary, /etc/passwd and /etc/group, the home directory and
// /tmp, and s.Extra.
func (s Spec) Files() []File {
	files := []File{
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte(passwd)},
		{Path: "/etc/group", Mode: 0o644, Data: []byte(group)},
		{Path: Home, Mode: fs.ModeDir | 0o700, UID: UID, GID: GID},
		{Path: TmpDir, Mode: fs.ModeDir | fs.ModeSticky | 0o777},
		{Path: Entrypoint(s.Name), Mode: 0o755, Data: s.Binary},
	}
	return append(files, s.Extra...)
}

// Layer writes files as a tar stream, sorted by path, every entry at mtime,
// with a root-owned 0755 directory for every parent not listed. Two files at
// one path are an error.
func Layer(files []File, mtime time.Time) ([]byte, error) {
	byPath := map[string]File{}
	for _, f := range files {
		if _, dup := byPath[f.Path]; dup {
			return nil, fmt.Errorf("image: %s is in the layer twice", f.Path)
		}
		byPath[f.Path] = f
	}
	for _, f := range files {
		for dir := path.Dir(f.Path); dir != "/"; dir = path.Dir(dir) {
			if d, ok := byPath[dir]; ok {
				if !d.Mode.IsDir() {
					return nil, fmt.Errorf("image: %s is a file and the parent of %s", dir, f.Path)
				}
				continue
			}
			byPath[dir] = File{Path: dir, Mode: fs.ModeDir | 0o755}
		}
	}
	paths := make([]string, 0, len(byPath))
	for p := range byPath {
		paths = append(paths, p)
	}
	slices.Sort(paths) // a parent is a prefix of its children: it sorts first

	mtime = mtime.UTC().Truncate(time.Second)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		f := byPath[p]
		hdr := &tar.Header{
			Name:    strings.TrimPrefix(p, "/"),
			Mode:    int64(f.Mode.Perm()),
			Uid:     f.UID,
			Gid:     f.GID,
			ModTime: mtime,
			Format:  tar.FormatPAX,
		}
		if f.Mode&fs.ModeSticky != 0 {
			hdr.Mode |= 0o1000 // c_ISVTX
		}
		switch {
		case f.Mode.IsDir():
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
		case f.Mode.Type() == 0:
			hdr.Typeflag = tar.TypeReg
			hdr.Size = int64(len(f.Data))
		default:
			return nil, fmt.Errorf("image: %s: only regular files and directories are supported, not %v", p, f.Mode.Type())
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("image: %s: %w", p, err)
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, fmt.Errorf("image: %s: %w", p, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("image: closing the layer: %w", err)
	}
	return buf.Bytes(), nil
}

// gzipped compresses b deterministically: no name, no time in the header.
// DefaultCompression: BestCompression saves 0.3% on a Cairn binary and
// takes 3 times as long.
func gzipped(b []byte) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(b); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Build assembles the image s describes: FROM scratch, one layer, running
// BinDir/Name as User in Home.
func Build(s Spec) (v1.Image, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	created := s.Created.UTC().Truncate(time.Second)
	raw, err := Layer(s.Files(), created)
	if err != nil {
		return nil, err
	}
	gz, err := gzipped(raw)
	if err != nil {
		return nil, fmt.Errorf("image: %s: compressing the layer: %w", s.Name, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(gz)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", s.Name, err)
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: creator,
			Comment:   s.comment(),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", s.Name, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", s.Name, err)
	}
	cf = cf.DeepCopy()
	cf.Created = v1.Time{Time: created}
	cf.Author = creator
	cf.OS = s.Platform.OS
	cf.Architecture = s.Platform.Architecture
	cf.Variant = s.Platform.Variant
	cf.Config = v1.Config{
		Entrypoint: []string{Entrypoint(s.Name)},
		User:       User,
		WorkingDir: Home,
		Env:        []string{"PATH=" + BinDir, "HOME=" + Home, "TMPDIR=" + TmpDir},
		Labels:     s.labels(),
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", s.Name, err)
	}
	return img, nil
}

func (s Spec) comment() string {
	c := fmt.Sprintf("%s, /etc/passwd and /etc/group (nonroot %d), %s, %s", Entrypoint(s.Name), UID, Home, TmpDir)
	if len(s.Extra) > 0 {
		paths := make([]string, len(s.Extra))
		for i, f := range s.Extra {
			paths[i] = f.Path
		}
		c += ", " + strings.Join(paths, ", ")
	}
	return c
}

func (s Spec) labels() map[string]string {
	l := map[string]string{
		"org.opencontainers.image.source":  Source,
		"org.opencontainers.image.url":     Source,
		"org.opencontainers.image.title":   "cairn " + s.Name,
		"org.opencontainers.image.version": s.Version,
		"org.opencontainers.image.created": s.Created.UTC().Truncate(time.Second).Format(time.RFC3339),
	}
	if s.Revision != "" {
		l["org.opencontainers.image.revision"] = s.Revision
	}
	if s.Description != "" {
		l["org.opencontainers.image.description"] = s.Description
	}
	return l
}

// ErrNotLinux is returned for a platform other than linux/<arch>.
var ErrNotLinux = errors.New("image: only linux platforms are built")

// ParsePlatform parses "linux/amd64" or "linux/arm64/v8".
func ParsePlatform(s string) (v1.Platform, error) {
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[1] == "" {
		return v1.Platform{}, fmt.Errorf("image: platform %q is not os/arch[/variant]", s)
	}
	if parts[0] != "linux" {
		return v1.Platform{}, fmt.Errorf("%w: %q", ErrNotLinux, s)
	}
	p := v1.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}
