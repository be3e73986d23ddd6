// Colour over alpha in one video frame (top half colour, bottom half alpha as grey) -> a transparent canvas.
// Video cannot carry alpha over WebRTC, so the server stacks it and the page puts it back together.
'use strict';

function createCompositor(canvas) {
  const gl = canvas.getContext('webgl', { alpha: true, premultipliedAlpha: true, antialias: false });
  return gl ? glCompositor(canvas, gl) : canvasCompositor(canvas);
}

function glCompositor(canvas, gl) {
  const vs = `attribute vec2 p; varying vec2 uv;
    void main() { uv = vec2(p.x + 1.0, 1.0 - p.y) * 0.5; gl_Position = vec4(p, 0.0, 1.0); }`;
  // Half a texel in from the seam, so bilinear filtering never mixes colour rows with alpha rows.
  const fs = `precision mediump float; uniform sampler2D t; uniform float texel; varying vec2 uv;
    void main() {
      float y = clamp(uv.y * 0.5, texel, 0.5 - texel);
      vec3 c = texture2D(t, vec2(uv.x, y)).rgb;
      float a = texture2D(t, vec2(uv.x, y + 0.5)).r;
      gl_FragColor = vec4(c * a, a);
    }`;
  const prog = gl.createProgram();
  for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
    const s = gl.createShader(type);
    gl.shaderSource(s, src);
    gl.compileShader(s);
    gl.attachShader(prog, s);
  }
  gl.linkProgram(prog);
  gl.useProgram(prog);
  gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer());
  gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
  const loc = gl.getAttribLocation(prog, 'p');
  gl.enableVertexAttribArray(loc);
  gl.vertexAttribPointer(loc, 2, gl.FLOAT, false, 0, 0);
  gl.bindTexture(gl.TEXTURE_2D, gl.createTexture());
  for (const [k, v] of [[gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE], [gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE],
    [gl.TEXTURE_MIN_FILTER, gl.LINEAR], [gl.TEXTURE_MAG_FILTER, gl.LINEAR]]) gl.texParameteri(gl.TEXTURE_2D, k, v);
  const texel = gl.getUniformLocation(prog, 'texel');
  const pixel = new Uint8Array(4);
  return {
    kind: 'webgl',
    draw(source, w, h2) {
      const h = h2 >> 1;
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
      gl.viewport(0, 0, w, h);
      gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, gl.RGB, gl.UNSIGNED_BYTE, source);
      gl.uniform1f(texel, 0.5 / h2);
      gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
    },
    clear() {
      gl.clearColor(0, 0, 0, 0);
      gl.clear(gl.COLOR_BUFFER_BIT);
    },
    // Valid right after draw (the drawing buffer is not preserved); x, y from the top left, in canvas pixels.
    sample(x, y) {
      gl.readPixels(x, canvas.height - 1 - y, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, pixel);
      const a = pixel[3];
      return a ? [pixel[0] * 255 / a, pixel[1] * 255 / a, pixel[2] * 255 / a, a].map(Math.round) : [0, 0, 0, 0];
    },
  };
}

function canvasCompositor(canvas) {
  const ctx = canvas.getContext('2d');
  const scratch = document.createElement('canvas');
  const sctx = scratch.getContext('2d', { willReadFrequently: true });
  let out = null;
  return {
    kind: '2d',
    draw(source, w, h2) {
      const h = h2 >> 1;
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
      if (scratch.width !== w || scratch.height !== h2) { scratch.width = w; scratch.height = h2; }
      sctx.drawImage(source, 0, 0, w, h2);
      const src = sctx.getImageData(0, 0, w, h2).data;
      if (!out || out.width !== w || out.height !== h) out = ctx.createImageData(w, h);
      const d = out.data;
      const offset = w * h * 4;
      for (let i = 0; i < offset; i += 4) {
        d[i] = src[i]; d[i + 1] = src[i + 1]; d[i + 2] = src[i + 2]; d[i + 3] = src[offset + i];
      }
      ctx.putImageData(out, 0, 0);
    },
    clear() {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
    },
    sample(x, y) {
      const i = (y * out.width + x) * 4;
      return Array.from(out.data.slice(i, i + 4));
    },
  };
}
