package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestContainer builds the image of Containerfile with podman from what release.sh
// stages, then checks its configuration and its files. Nothing runs in it: containers
// cannot be started on CI's machines (their rlimits cannot be set), and the build needs
// no container either (Containerfile has no RUN).
func TestContainer(t *testing.T) {
	podman, err := exec.LookPath("podman")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("podman is missing: apt-get install -y podman")
		}
		t.Skip("needs podman: apt-get install -y podman")
	}
	const version, source = "v0.0.0-test.1", "https://example.com/broker"
	// The build context: dist/ as release.sh leaves it, nothing else.
	buildContext := t.TempDir()
	bin := release(t, filepath.Join(buildContext, "dist"), version, "linux", runtime.GOARCH)
	containerfile, err := filepath.Abs("Containerfile")
	if err != nil {
		t.Fatal(err)
	}

	// podman keeps its images, state and temporary files in this test's own folder, so
	// the test neither meets nor leaves anything in the machine's storage, whatever driver
	// that uses. vfs needs no mount and no kernel module (it copies each layer), so it
	// works wherever podman does, nested in a container too; no daemon is involved.
	storage := t.TempDir()
	for _, d := range []string{"root", "run", "tmp", "volumes", "var-tmp"} {
		if err := os.Mkdir(filepath.Join(storage, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	pm := func(timeout time.Duration, args ...string) []byte {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), timeout) // also in Cleanup
		defer cancel()
		global := []string{
			"--root", filepath.Join(storage, "root"), "--runroot", filepath.Join(storage, "run"),
			"--tmpdir", filepath.Join(storage, "tmp"), "--volumepath", filepath.Join(storage, "volumes"),
			"--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
		}
		cmd := exec.CommandContext(ctx, podman, append(global, args...)...)
		cmd.Env = append(os.Environ(), "TMPDIR="+filepath.Join(storage, "var-tmp")) // image blobs in transit
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
		}
		return stdout.Bytes()
	}
	if os.Geteuid() != 0 {
		// Rootless, the image's files belong to the user's subordinate IDs: only the
		// user namespace can remove them (before TempDir's own cleanup, which runs later).
		t.Cleanup(func() {
			cmd := exec.Command(podman, "unshare", "rm", "-rf", filepath.Join(storage, "root"))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("podman unshare rm: %v\n%s", err, out)
			}
		})
	}

	tag := fmt.Sprintf("localhost/broker-test:%d-%d", os.Getpid(), time.Now().UnixNano())
	pm(2*time.Minute, "build", "--layers=false", "--pull=never", "--platform", "linux/"+runtime.GOARCH,
		"--build-arg", "VERSION="+version, "--build-arg", "SOURCE="+source,
		"-t", tag, "-f", containerfile, buildContext)
	t.Cleanup(func() { pm(time.Minute, "rmi", tag) })

	var images []struct {
		Os, Architecture string
		Config           struct {
			User         string
			ExposedPorts map[string]struct{}
			Env          []string
			Entrypoint   []string
			Cmd          []string
			Volumes      map[string]struct{}
			WorkingDir   string
			Labels       map[string]string
		}
	}
	if err := json.Unmarshal(pm(30*time.Second, "image", "inspect", tag), &images); err != nil || len(images) != 1 {
		t.Fatalf("podman image inspect: %d images, %v", len(images), err)
	}
	img, c := images[0], images[0].Config
	if img.Os != "linux" || img.Architecture != runtime.GOARCH {
		t.Errorf("image for %s/%s; want linux/%s", img.Os, img.Architecture, runtime.GOARCH)
	}
	if c.User != "65532:65532" {
		t.Errorf("User %q; want 65532:65532 (not root)", c.User)
	}
	if _, ok := c.ExposedPorts["8080/tcp"]; !ok || len(c.ExposedPorts) != 1 {
		t.Errorf("ExposedPorts %v; want 8080/tcp", c.ExposedPorts)
	}
	if _, ok := c.Volumes["/data"]; !ok || len(c.Volumes) != 1 {
		t.Errorf("Volumes %v; want /data", c.Volumes)
	}
	if !slices.Contains(c.Env, "BROKER_DB=/data") {
		t.Errorf("Env %q lacks BROKER_DB=/data", c.Env)
	}
	for _, e := range c.Env {
		name, _, _ := strings.Cut(e, "=")
		if strings.HasPrefix(name, "BROKER_") && name != "BROKER_DB" {
			t.Errorf("Env has %s: secrets and settings belong to the run, not the image", name)
		}
	}
	if !slices.Equal(c.Entrypoint, []string{"/broker"}) || len(c.Cmd) != 0 || c.WorkingDir != "/data" {
		t.Errorf("Entrypoint %q Cmd %q WorkingDir %q; want [/broker], none and /data", c.Entrypoint, c.Cmd, c.WorkingDir)
	}
	for k, want := range map[string]string{
		"org.opencontainers.image.title":    "broker",
		"org.opencontainers.image.licenses": "MIT",
		"org.opencontainers.image.version":  version,
		"org.opencontainers.image.source":   source,
	} {
		if got := c.Labels[k]; got != want {
			t.Errorf("label %s is %q; want %q", k, got, want)
		}
	}

	// The files: exactly the binary and the CA roots, both root's, and /data the user's.
	archive := filepath.Join(storage, "image.tar")
	pm(time.Minute, "save", "--format", "docker-archive", "-o", archive, tag)
	files := imageFiles(t, archive)
	want, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range files {
		switch {
		case name == "broker":
			if f.Typeflag != tar.TypeReg || f.Mode&0o7777 != 0o755 || f.Uid != 0 || f.Gid != 0 || !bytes.Equal(f.data, want) {
				t.Errorf("/broker: %v owner %d:%d, the binary of release.sh: %t; want root's 0755 binary of release.sh",
					f.FileInfo().Mode(), f.Uid, f.Gid, bytes.Equal(f.data, want))
			}
		case name == "data":
			if f.Typeflag != tar.TypeDir || f.Uid != 65532 || f.Gid != 65532 || f.Mode&0o700 != 0o700 {
				t.Errorf("/data: %v owner %d:%d; want a folder of 65532:65532", f.FileInfo().Mode(), f.Uid, f.Gid)
			}
		case name == "etc/ssl/certs/ca-certificates.crt":
			if f.Typeflag != tar.TypeReg || f.Uid != 0 || f.Mode&0o022 != 0 || !x509.NewCertPool().AppendCertsFromPEM(f.data) {
				t.Errorf("/%s: %v owner %d, PEM certificates: %t; want root's certificates",
					name, f.FileInfo().Mode(), f.Uid, x509.NewCertPool().AppendCertsFromPEM(f.data))
			}
		case f.Typeflag == tar.TypeDir && (name == "etc" || name == "etc/ssl" || name == "etc/ssl/certs"):
		default:
			t.Errorf("unexpected file in the image: /%s (%v)", name, f.FileInfo().Mode())
		}
	}
	for _, name := range []string{"broker", "data", "etc/ssl/certs/ca-certificates.crt"} {
		if _, ok := files[name]; !ok {
			t.Errorf("the image has no /%s", name)
		}
	}
}

type imageFile struct {
	*tar.Header
	data []byte
}

// imageFiles reads an image saved by podman save --format docker-archive and returns its
// files by path (without the leading slash), later layers over earlier ones.
func imageFiles(t *testing.T, archive string) map[string]imageFile {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	members := map[string][]byte{} // the layers and manifest.json
	for tr := tar.NewReader(f); ; {
		h, err := tr.Next()
		if err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if members[path.Clean(h.Name)], err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
	}
	var manifest []struct{ Layers []string }
	if err := json.Unmarshal(members["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("manifest.json of the saved image: %v %s", err, members["manifest.json"])
	}
	files := map[string]imageFile{}
	for _, layer := range manifest[0].Layers {
		data, ok := members[path.Clean(layer)]
		if !ok {
			t.Fatalf("layer %s missing from the saved image", layer)
		}
		for tr := tar.NewReader(bytes.NewReader(data)); ; {
			h, err := tr.Next()
			if err == io.EOF {
				break
			} else if err != nil {
				t.Fatalf("layer %s: %v", layer, err)
			}
			name := strings.TrimPrefix(path.Clean("/"+h.Name), "/")
			if strings.HasPrefix(path.Base(name), ".wh.") {
				t.Errorf("layer %s removes a file: %s", layer, name)
				continue
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[name] = imageFile{h, b}
		}
	}
	return files
}
